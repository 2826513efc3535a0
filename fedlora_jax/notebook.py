"""Quick ablations, as the notebooks run them: a few variants of a preset trained together (packed
into one compiled program where their shapes agree, :func:`fedlora_jax.train.train_all`) and their
held-out accuracy drawn against rounds and against simulated wall-clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedlora_jax.config import load_config
from fedlora_jax.metrics import load_metrics
from fedlora_jax.train import train_all


def run_variants(preset: str, variants: dict[str, dict[str, Any]], out: str | Path,
                 **common: Any) -> dict[str, dict[str, np.ndarray]]:
    """Trains one run of ``preset`` per variant (its name: its dotted settings, on top of
    ``common``) afresh into ``out/NAME`` and returns each run's metrics as arrays."""
    cfgs = [load_config(preset=preset, overrides=[
        f"{key}={value}" for key, value in {**common, "output_dir": Path(out) / name,
                                            **settings}.items()])
        for name, settings in variants.items()]
    train_all(cfgs, log=lambda line: None)
    return {name: load_metrics(cfg.output_dir) for name, cfg in zip(variants, cfgs)}


def compare_figure(results: dict[str, dict[str, np.ndarray]], title: str, path: str | Path):
    """Held-out accuracy of every run against rounds (left) and simulated seconds (right), saved
    to ``path``; returns the figure (a notebook shows it)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (x, label) in zip(axes, (("round", "round"),
                                     ("sim_clock_s", "simulated wall-clock (s)"))):
        for name, m in results.items():
            keep = np.isfinite(m["eval_accuracy"])
            ax.plot(m[x][keep], m["eval_accuracy"][keep], marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy")
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return fig
