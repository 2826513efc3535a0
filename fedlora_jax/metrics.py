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


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def log_x_axis(ax, values, ticks=None) -> None:
    """A readable logarithmic x axis over ``values``: labelled at ``ticks`` (e.g. a grid's points)
    or else at powers of ten (1-2-5 steps within two decades), short labels, no minor labels."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if ticks is None:
        values = np.asarray(values, np.float64)
        values = values[np.isfinite(values) & (values > 0)]
        decades = np.log10(values.max() / values.min()) if values.size else 0.0
        subs = (1.0,) if decades > 2 else (1.0, 2.0, 5.0)
        locator = ticker.LogLocator(subs=subs, numticks=8)
    else:
        locator = ticker.FixedLocator(sorted(set(ticks)))
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _short(v)))


def _short(v: float) -> str:
    """``2000 -> '2000'``, ``4e11 -> '4e11'``, ``0.5 -> '0.5'``."""
    if v <= 0 or 1e-3 <= v < 1e5:
        return f"{v:g}"
    exponent = int(math.floor(math.log10(v)))
    return f"{v / 10 ** exponent:.3g}e{exponent}"


def _series(m: dict[str, np.ndarray], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` over the rows where both are finite."""
    if x not in m or y not in m:
        return np.zeros(0), np.zeros(0)
    keep = np.isfinite(m[x]) & np.isfinite(m[y])
    return m[x][keep], m[y][keep]


def plot_learning_curves(m: dict[str, np.ndarray], path: Path) -> Path:
    """Loss and accuracy (train and held-out) against rounds and against simulated wall-clock."""
    plt = pyplot()
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


ROUND_PARTS = ("total", "download", "compute", "upload", "server")


def plot_round_times(m: dict[str, np.ndarray], path: Path) -> Path:
    """Distribution of the simulated round time and of its parts (the parts that cost time in
    this run), on shared bins with an integer count axis."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    parts = {part: values[np.isfinite(values)] for part in ROUND_PARTS
             if (values := m.get(f"round_{part}_s")) is not None}
    parts = {part: values for part, values in parts.items() if values.size and values.any()}
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    if parts:
        edges = np.histogram_bin_edges(np.concatenate(list(parts.values())),
                                       bins=min(30, max(5, len(m["round"]) // 2)))
        for part, values in parts.items():
            ax.hist(values, bins=edges, alpha=0.5, label=part)
        ax.legend()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("simulated round time (s)")
    ax.set_ylabel("rounds")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


RESOURCES = {"flops_per_s": "compute speed (FLOP/s)", "snr_hz": "p h / N0 (Hz)"}


def plot_allocation(allocation: dict[str, list[float]], path: Path,
                    title: str = "allocation per client") -> Path:
    """Each client's sampling probability ``q`` and sketch ratio ``rho`` against its resources."""
    plt = pyplot()
    resources = [name for name in RESOURCES if name in allocation]
    fig, axes = plt.subplots(2, len(resources), figsize=(4.5 * len(resources), 7), squeeze=False,
                             constrained_layout=True)
    for row, name in enumerate(("q", "rho")):
        for col, resource in enumerate(resources):
            ax = axes[row, col]
            ax.scatter(allocation[resource], allocation[name], s=10, alpha=0.7)
            log_x_axis(ax, allocation[resource])
            ax.set_xlabel(RESOURCES[resource])
            ax.set_ylabel(name)
    fig.suptitle(title)
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
