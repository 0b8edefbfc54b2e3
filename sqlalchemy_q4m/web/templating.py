"""The dashboard's Jinja2 environment (autoescaped) and the filters and chart its templates
use."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

import jinja2

__all__ = ["HERE", "chart", "environment"]

HERE = Path(__file__).parent


def _age(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "\u2013"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m {seconds % 60:.0f}s"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h {seconds % 3600 / 60:.0f}m"
    return f"{seconds / 86400:.0f}d {seconds % 86400 / 3600:.0f}h"


def _since(unix: float) -> str:
    return _age(time.time() - unix)


def _number(value: int | None) -> str:
    return "\u2013" if value is None else f"{value:,}"


def _pretty(payload: str) -> str:
    """A JSON text indented for reading (left as it is when it is not JSON)."""
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False, sort_keys=True)
    except (ValueError, TypeError):
        return payload


def chart(series: list[tuple[dt.datetime, int, int]]) -> dict[str, Any]:
    """Bars for an inline SVG: one per minute, done above failed (numbers only)."""
    peak = max([d + f for _, d, f in series] + [1])
    width, height = 600, 120
    step = width / max(1, len(series))
    bars = []
    for i, (minute, done, failed) in enumerate(series):
        h_done = height * done / peak
        h_failed = height * failed / peak
        bars.append(
            {
                "x": round(i * step, 2),
                "w": round(max(1.0, step - 1), 2),
                "done_y": round(height - h_done, 2),
                "done_h": round(h_done, 2),
                "failed_y": round(height - h_done - h_failed, 2),
                "failed_h": round(h_failed, 2),
                "title": f"{minute:%H:%M} UTC: {done} done, {failed} failed",
            }
        )
    total_done = sum(d for _, d, _ in series)
    total_failed = sum(f for _, _, f in series)
    return {
        "bars": bars,
        "width": width,
        "height": height,
        "peak": peak,
        "done": total_done,
        "failed": total_failed,
        "rate": total_done / max(1, len(series)) / 60,
    }


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,  # every value is user data: payloads, errors, table names
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = _age
    env.filters["since"] = _since
    env.filters["number"] = _number
    env.filters["pretty"] = _pretty
    return env
