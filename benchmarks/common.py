"""What every benchmark script shares: its command line (``--quick``, ``--json PATH``), interleaved
best-of-N timing with its spread, the load average, the machine's measured matmul peak, and its
rows tagged with the machine and written as JSON.

jax is imported inside the functions that use it, so a script may set ``XLA_FLAGS`` after
importing this module (``device_scaling.py`` splits the CPU into host devices)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np


def machine() -> dict:
    """Where and when a row was measured (ratios are only comparable within one such run)."""
    import jax

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


def parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The convention of every benchmark: ``--quick`` (about a minute) and ``--json PATH``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--json", help="write the rows (a list of dicts) to this JSON file")
    return p


def interleaved_times(fns: dict[str, Callable], repeats: int) -> dict[str, np.ndarray]:
    """Wall times of every ``fns[name]()`` over ``repeats`` rounds, after one warm-up (compile)
    call each. Each round calls every function once (a, b, a, b, ...), so on a shared machine all
    sides see the same load. JAX results are waited for; others (e.g. torch tensors) pass through."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(t) for name, t in times.items()}


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    return float(interleaved_times({"fn": fn}, repeats)["fn"].min())


def spread(seconds: np.ndarray) -> dict[str, float]:
    """``min`` (the figure a benchmark reports), ``median`` and ``max`` of repeated wall times."""
    return {"min": float(np.min(seconds)), "median": float(np.median(seconds)),
            "max": float(np.max(seconds))}


def fmt_spread(seconds: dict[str, float], scale: float = 1e3) -> str:
    """``min/median/max`` in milliseconds (by default), for a printed table."""
    return "/".join(f"{seconds[k] * scale:.3g}" for k in ("min", "median", "max"))


def load_average() -> float:
    """The machine's 1-minute load average, recorded next to every figure (a shared machine)."""
    return round(os.getloadavg()[0], 2)


def jax_matmul_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured ``n x n`` matmul rate of XLA on this machine in ``dtype``: the ceiling for a local
    step computing in it."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / best_time(lambda: mm(a), repeats) / 1e9
