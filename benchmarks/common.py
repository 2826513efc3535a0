"""What every benchmark script does with its rows: tag them with the machine and date, write JSON."""

from __future__ import annotations

import json
import os
import platform
import time

import jax


def machine() -> dict:
    """Where and when a row was measured (ratios are only comparable within one such run)."""
    return {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "backend": jax.default_backend(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_rows(rows: list[dict], path: str | None, **extra) -> list[dict]:
    """Adds :func:`machine` and ``extra`` to every row; writes the list to ``path`` as JSON."""
    meta = {**machine(), **extra}
    rows = [{**row, **meta} for row in rows]
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows
