"""``make demo``: the main job on the embedded default model.

Runs a sampling loop on a Flux-architecture transformer with Inductor and with omnicache's
default policy, side by side, and prints the report and the speedup (``bench/speed.py
--small``).  The trained reference model replaces the random-weight transformer when it lands.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import speed  # noqa: E402

if __name__ == "__main__":
    speed.main(["--small", "--methods", "inductor,static-variants"] + sys.argv[1:])
