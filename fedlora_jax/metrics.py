"""A run's metrics: one JSON line per round in ``metrics.jsonl``, read back as arrays, exported to
CSV, and plotted (loss and accuracy against rounds and simulated wall-clock, round times, and the
allocation ``(q, rho)`` against client resources).

Rows differ in their keys (held-out metrics exist only on evaluation rounds), so arrays are aligned
by row and hold NaN where a row lacks the key.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.jsonl"
ALLOCATION_FILE = "allocation.json"


def _jsonl_path(path: str | Path) -> Path:
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def read_rows(path: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (``path``: the file or its run directory)."""
    file = _jsonl_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No metrics at {file}; is this a run directory?")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}, line {number}: not a JSON row ({e.msg}); remove or fix "
                             "that line.") from None
    return rows


def truncate(path: str | Path, last_round: int) -> list[dict]:
    """Keeps the rows of rounds ``<= last_round`` (a checkpoint's round) and returns them."""
    file = _jsonl_path(path)
    rows = [row for row in read_rows(file) if row["round"] <= last_round]
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def to_arrays(rows: list[dict]) -> dict[str, np.ndarray]:
    """Column arrays over rows, in order of first appearance; NaN where a row lacks a key."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: np.array([row.get(key, math.nan) for row in rows], np.float64) for key in keys}


def load_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """``metrics.jsonl`` (or its run directory) as ``{name: (rows,) float64 array}``."""
    return to_arrays(read_rows(path))


def to_csv(metrics: dict[str, np.ndarray] | str | Path, out: str | Path) -> Path:
    """Writes metrics (arrays, or the path of a run) as CSV; NaN becomes an empty cell."""
    arrays = metrics if isinstance(metrics, dict) else load_metrics(metrics)
    out = Path(out)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(arrays)
        for values in zip(*arrays.values()):
            writer.writerow(["" if math.isnan(v) else repr(float(v)) for v in values])
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(m: dict[str, np.ndarray], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` over the rows where both are finite."""
    if x not in m or y not in m:
        return np.zeros(0), np.zeros(0)
    keep = np.isfinite(m[x]) & np.isfinite(m[y])
    return m[x][keep], m[y][keep]


def plot_learning_curves(m: dict[str, np.ndarray], path: Path) -> Path:
    """Loss and accuracy (train and held-out) against rounds and against simulated wall-clock."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for row, metric in enumerate(("loss", "accuracy")):
        for col, (x, label) in enumerate((("round", "round"),
                                          ("sim_clock_s", "simulated wall-clock (s)"))):
            ax = axes[row, col]
            for split in ("train", "eval"):
                xs, ys = _series(m, x, f"{split}_{metric}")
                ax.plot(xs, ys, marker="o" if split == "eval" else None, ms=3,
                        label="held-out" if split == "eval" else "train (participants)")
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_round_times(m: dict[str, np.ndarray], path: Path) -> Path:
    """Distribution of the simulated round time and of its compute / upload parts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for part in ("total", "compute", "upload"):
        values = m.get(f"round_{part}_s", np.zeros(0))
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=min(30, max(5, values.size // 2)), alpha=0.5, label=part)
    ax.set_xlabel("simulated round time (s)")
    ax.set_ylabel("rounds")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RESOURCES = {"flops_per_s": "compute speed (FLOP/s)", "snr_hz": "p h / N0 (Hz)"}


def plot_allocation(allocation: dict[str, list[float]], path: Path) -> Path:
    """Each client's sampling probability ``q`` and sketch ratio ``rho`` against its resources."""
    plt = _pyplot()
    resources = [name for name in RESOURCES if name in allocation]
    fig, axes = plt.subplots(2, len(resources), figsize=(4.5 * len(resources), 7), squeeze=False,
                             constrained_layout=True)
    for row, name in enumerate(("q", "rho")):
        for col, resource in enumerate(resources):
            ax = axes[row, col]
            ax.scatter(allocation[resource], allocation[name], s=10, alpha=0.7)
            ax.set_xscale("log")
            ax.set_xlabel(RESOURCES[resource])
            ax.set_ylabel(name)
    fig.suptitle("allocation per client")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Rebuilds a run's figures and ``metrics.csv`` from its saved files; returns their paths."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    m = load_metrics(run_dir)
    written = [to_csv(m, out / "metrics.csv"), plot_learning_curves(m, out / "learning_curves.png")]
    if np.isfinite(m.get("round_total_s", np.zeros(0))).any():
        written.append(plot_round_times(m, out / "round_times.png"))
    allocation_file = run_dir / ALLOCATION_FILE
    if allocation_file.is_file():
        allocation = json.loads(allocation_file.read_text())
        if {"q", "rho"} <= allocation.keys() and RESOURCES.keys() & allocation.keys():
            written.append(plot_allocation(allocation, out / "allocation.png"))
    return written
