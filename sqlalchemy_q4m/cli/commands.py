"""The ``q4m`` entry point: parse the arguments, run the command, and turn an error (with its
causes, without the URL's password) into one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import SQLAlchemyError

from ..exc import Q4MError
from ..worker.runtime import EXIT_USAGE
from .parser import build_parser

__all__ = ["build_parser", "main"]


def _one_line(err: BaseException) -> str:
    """The error and its causes on one line."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and current.orig is not None:
            message = f"database error: {current.orig}"
            seen.add(id(current.orig))  # said already: not again as the cause
        else:
            message = str(current).strip() or type(current).__name__
        parts.append(" ".join(message.split()))
        current = current.__cause__
    return " (caused by: ".join(parts) + ")" * (len(parts) - 1)


def _hide_password(message: str, url: str | None) -> str:
    """``message`` without the password of ``url``, should any layer have quoted it."""
    try:
        password = make_url(url).password if url else None
    except (ArgumentError, ValueError):
        password = None
    return message.replace(password, "***") if password else message


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run ``q4m``; returns the exit code (2 for bad input, with a one-line message)."""
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except (Q4MError, SQLAlchemyError, OSError) as err:
        message = _hide_password(_one_line(err), getattr(args, "url", None))
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        sys.stderr.write(f"q4m: error: {message}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("q4m: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
