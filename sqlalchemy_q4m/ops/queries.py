"""The names of :mod:`sqlalchemy_q4m.ops` under the module path they had before the ops
queries were split by subject; ``worker/metrics.py`` imports it until it imports the package."""

from __future__ import annotations

from . import *  # noqa: F403
from . import __all__ as __all__
