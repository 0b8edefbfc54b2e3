"""The job identity column type and its generator.

Q4M tables hold no keys and no AUTO_INCREMENT, yet the ORM needs an identity, and two jobs
with equal payloads must stay two jobs.  Every queue row therefore carries a client-made,
time-ordered 128-bit id (a UUIDv7, RFC 9562) stored as ``BINARY(16)``: unique without any
server help, and ordered by creation time so the portable backend can serve FIFO by key.

Both halves sit on the enqueue hot path (one id and one bind per row of a bulk insert), so
they avoid per-call overhead that buys nothing here: see :func:`new_job_id` and
:meth:`JobId.bind_processor`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.types import BINARY
from sqlalchemy.types import TypeDecorator

__all__ = ["JobId", "new_job_id"]

_UUID = uuid.UUID
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_new_object = object.__new__
_set_attr = object.__setattr__

#: Random bytes are read from the OS this many at a time (8 per id): one system call per
#: 512 ids instead of one per id.
_RANDOM_CHUNK = 4096

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_random = b""
_random_at = 0


def _after_fork_in_child() -> None:
    """A forked child must not reuse its parent's unread random bytes (two processes would
    then make ids differing only by counter), nor inherit a lock another thread held."""
    global _lock, _random, _random_at
    _lock = threading.Lock()
    _random = b""
    _random_at = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def new_job_id() -> uuid.UUID:
    """Return a new UUIDv7: 48-bit Unix milliseconds, a 12-bit in-millisecond counter, random.

    Ids made by one process are strictly increasing; across processes they are ordered by
    millisecond and unique by their 62 random bits (from :func:`os.urandom`).
    """
    global _last_ms, _counter, _random, _random_at
    with _lock:
        at = _random_at
        if at >= len(_random):
            _random = os.urandom(_RANDOM_CHUNK)
            at = 0
        _random_at = at + 8
        rand = int.from_bytes(_random[at : at + 8], "big")
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = rand >> 53  # random start in the lower half of the 12-bit range
        else:
            _counter += 1
            if _counter > 0xFFF:  # more than ~2000 ids in one ms: borrow the next ms
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76 | counter << 64
    value |= 0b10 << 62 | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    # uuid.UUID(int=value) less its argument checks (the value is in range by construction);
    # the same two slots the constructor sets, so the result is an ordinary UUID.
    job_id: uuid.UUID = _new_object(_UUID)
    _set_attr(job_id, "int", value)
    _set_attr(job_id, "is_safe", _SAFE_UNKNOWN)
    return job_id


def _job_id_bytes(value: Any) -> bytes | None:
    """A job id as its 16 big-endian bytes: from a UUID, 16 bytes, or a UUID string."""
    if value.__class__ is _UUID:
        return value.int.to_bytes(16, "big")
    if value is None:
        return None
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, bytes | bytearray) and len(value) == 16:
        return bytes(value)
    return uuid.UUID(str(value)).bytes


def _job_id_from_bytes(value: Any) -> uuid.UUID | None:
    """``uuid.UUID(bytes=bytes(value))`` for a loaded id, less its generic argument checks
    (as :func:`new_job_id` builds one)."""
    if value is None:
        return None
    if len(value) != 16:
        raise ValueError("bytes is not a 16-char string")
    job_id: uuid.UUID = _new_object(_UUID)
    _set_attr(job_id, "int", int.from_bytes(value, "big"))
    _set_attr(job_id, "is_safe", _SAFE_UNKNOWN)
    return job_id


class JobId(TypeDecorator[uuid.UUID]):
    """A :class:`uuid.UUID` stored as ``BINARY(16)`` (big-endian, so byte order is time order)."""

    impl = BINARY(16)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        return _job_id_bytes(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """One plain function per bound id, instead of the generic wrapper that calls
        :meth:`process_bind_param` and then ``BINARY``'s processor.

        ``BINARY``'s processor only passes the bytes through the DBAPI's ``Binary``; when
        that hands plain bytes back (PyMySQL, mysqlclient, aiomysql, asyncmy) it is skipped.
        """
        impl_processor = self.impl_instance.bind_processor(dialect)
        if impl_processor is None or _binary_is_plain_bytes(dialect):
            return _job_id_bytes

        def process(value: Any) -> Any:
            return impl_processor(_job_id_bytes(value))

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> uuid.UUID | None:
        if value is None:
            return None
        return uuid.UUID(bytes=bytes(value))

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        """One plain function per loaded id (every claimed job has one), instead of the
        generic wrapper that calls :meth:`process_result_value` and ``uuid.UUID``'s checks;
        the same UUIDs, and the same ``ValueError`` for a value that is not 16 bytes."""
        if self.impl_instance.result_processor(dialect, coltype) is not None:
            return super().result_processor(dialect, coltype)  # pragma: no cover - no driver
        return _job_id_from_bytes

    @property
    def python_type(self) -> type[uuid.UUID]:
        return uuid.UUID


def _binary_is_plain_bytes(dialect: Dialect) -> bool:
    """True when the dialect's DBAPI ``Binary`` returns its bytes argument as plain bytes."""
    binary = getattr(dialect.dbapi, "Binary", None)
    if binary is None:
        return False
    probe = b"\x00" * 16
    try:
        wrapped = binary(probe)
    except Exception:
        return False
    return wrapped.__class__ is bytes and wrapped == probe
