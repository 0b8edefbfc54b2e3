"""Connecting for a command: a driver's complaint about the URL is one line, before any work."""

from __future__ import annotations

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..exc import Q4MError
from ..worker.runtime import make_engine

__all__ = ["connect", "probe"]


def connect(engine: Engine) -> Connection:
    """``engine.connect()``; a driver's own complaint about the URL's parameters (a
    ``TypeError`` for an unknown one, a ``ValueError`` for a bad value: not database errors)
    becomes a one-line :class:`Q4MError`."""
    try:
        return engine.connect()
    except SQLAlchemyError:
        raise
    except (TypeError, ValueError, AttributeError, LookupError) as err:
        safe = engine.url.render_as_string(hide_password=True)
        raise Q4MError(f"cannot connect to {safe}: {type(err).__name__}: {err}") from None


def probe(url: str) -> None:
    """Connect once as :func:`connect` does, so that a driver's complaint about the URL is
    one line before workers start; database errors are left to the command's own checks."""
    engine = make_engine(url)
    try:
        connect(engine).close()
    except SQLAlchemyError:
        pass
    finally:
        engine.dispose()
