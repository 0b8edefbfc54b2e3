"""``python -m sqlalchemy_q4m``: the ``q4m`` command line."""

from __future__ import annotations

import sys

from .cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
