"""Triton kernels of omnicompile (installed as ``omnicompile.kernels``).

Each kernel file holds ``_x_kernel`` (Triton), ``x()`` (launcher with input checks) and
``x_reference()`` (plain torch), exposed to Inductor as ``torch.ops.omnicompile.*``.  This
package depends on nothing else of ours.  (The merge/unmerge kernels of the token, frame
and block caches arrive with that feature.)
"""
