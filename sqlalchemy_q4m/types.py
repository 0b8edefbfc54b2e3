"""The job identity column type and its generator.

Q4M tables hold no keys and no AUTO_INCREMENT, yet the ORM needs an identity, and two jobs
with equal payloads must stay two jobs.  Every queue row therefore carries a client-made,
time-ordered 128-bit id (a UUIDv7, RFC 9562) stored as ``BINARY(16)``: unique without any
server help, and ordered by creation time so the portable backend can serve FIFO by key.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.types import BINARY
from sqlalchemy.types import TypeDecorator

__all__ = ["JobId", "new_job_id"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_job_id() -> uuid.UUID:
    """Return a new UUIDv7: 48-bit Unix milliseconds, a 12-bit in-millisecond counter, random.

    Ids made by one process are strictly increasing; across processes they are ordered by
    millisecond and unique by their 62 random bits.
    """
    global _last_ms, _counter
    rand = int.from_bytes(os.urandom(8), "big")
    with _lock:
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
    return uuid.UUID(int=value)


class JobId(TypeDecorator[uuid.UUID]):
    """A :class:`uuid.UUID` stored as ``BINARY(16)`` (big-endian, so byte order is time order)."""

    impl = BINARY(16)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        if isinstance(value, uuid.UUID):
            return value.bytes
        if isinstance(value, bytes | bytearray) and len(value) == 16:
            return bytes(value)
        return uuid.UUID(str(value)).bytes

    def process_result_value(self, value: Any, dialect: Dialect) -> uuid.UUID | None:
        if value is None:
            return None
        return uuid.UUID(bytes=bytes(value))

    @property
    def python_type(self) -> type[uuid.UUID]:
        return uuid.UUID
