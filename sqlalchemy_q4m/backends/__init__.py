"""The two ways to own a job, behind :class:`~sqlalchemy_q4m.backends.base.Backend`."""

from __future__ import annotations

from ..server import BackendName
from .base import Backend
from .base import Claim
from .native import NativeBackend
from .portable import PortableBackend

__all__ = ["Backend", "Claim", "NativeBackend", "PortableBackend", "get_backend"]

_BACKENDS: dict[BackendName, Backend] = {
    "native": NativeBackend(),
    "portable": PortableBackend(),
}


def get_backend(name: BackendName) -> Backend:
    """The (stateless, shared) backend object for ``name``."""
    return _BACKENDS[name]
