"""``python -m omnicompile ...`` is the ``omnicache`` command (:mod:`omnicompile.cli`)."""

from omnicompile.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
