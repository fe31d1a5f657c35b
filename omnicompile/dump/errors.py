"""The dump's exceptions."""
from __future__ import annotations

from omnicompile.errors import OmniCacheError

__all__ = ["DumpError", "VizUnavailable"]


class DumpError(OmniCacheError):
    """A dump file cannot be written or re-loaded; the message says which and why."""


class VizUnavailable(DumpError, ImportError):
    """matplotlib is missing (drawing the plan heatmap and the fallback unit graph needs it).

    :func:`~omnicompile.dump.write.write_graph_dump` treats it as a deliberate skip, strict
    mode included: the images are left out and the manifest says why."""
