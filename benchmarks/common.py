"""What every benchmark script shares: its command line (``--quick``, ``--json PATH``), best-of-N
timing, the machine's measured matmul peak, and its rows tagged with the machine and written as JSON.

jax is imported inside the functions that use it, so a script may set ``XLA_FLAGS`` after
importing this module (``device_scaling.py`` splits the CPU into host devices)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


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


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls after one warm-up (compile) call; JAX
    results are waited for, other results (e.g. torch tensors) pass through."""
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 ``n x n`` matmul rate of XLA on this machine: the ceiling for a local step."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / best_time(lambda: mm(a), repeats) / 1e9
