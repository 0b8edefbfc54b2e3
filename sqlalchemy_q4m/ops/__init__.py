"""The queries about queues, dead letters and workers that the CLI, the demo and the
dashboard share."""

from __future__ import annotations

from .queries import *  # noqa: F403
