"""The ``q4m`` command line: it parses arguments and calls the layers below."""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
