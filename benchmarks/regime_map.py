"""Where the paper's allocation pays, as its own model predicts it: the solver's speedup of
``adaptive`` over the best fixed baseline across system settings (no training).

    python benchmarks/regime_map.py --out docs/results/regime_map [--quick]

For each cell of three maps (uplink bandwidth x spread of compute speeds, cell radius x number
of clients, adapter payload x spread of compute speeds) and each of ``--draws`` network draws,
the solver minimizes its predicted wall-clock ``J(q, rho) = (alpha V + beta) E[T]`` and the
predicted speedup is ``min_b J(b) / J(q*, rho*)`` over its fixed baselines ``b`` (uniform ``q`` at
full rank = FedIT's allocation, uniform ``q`` at the fixed sketch ratio = FSLoRA's, everyone at
full rank). The cell shows the median over draws. The solver never returns a plan worse than the
baselines, so every predicted speedup is >= 1; whether it holds in training is what the measured
points check (``benchmarks/regime_measured.py``: ``fedlora-jax compare`` at a few cells).

The run being modelled is a preset (``--preset``, default ``tiny``): its workload, data weights,
per-round overhead and client optimizer law. ``G_n^2`` (the same for every client) and the signal
``|g|^2`` come from ``--g2`` / ``--signal`` (defaults: the estimates an ``adaptive`` run of the
tiny preset, seed 0, logged at round 10: ``est_g2_mean``, ``est_signal`` in its metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from fedlora_jax import solver as solver_lib
from fedlora_jax import theory, wireless
from fedlora_jax.build import build, strategy_context
from fedlora_jax.config import load_config

G2, SIGNAL = 0.123, 0.095  # tiny preset, adaptive, seed 0, round 10 (AdamW 5e-3)


@dataclasses.dataclass(frozen=True)
class Model:
    """What the solver is told about the run, besides the network: from a built preset."""

    workload: wireless.WorkloadModel
    overhead_s: float
    law: theory.UpdateLaw
    rank: int
    q_default: float
    participants: float
    num_clients: int  # the preset's, where a cell does not set it


def model_of(preset: str) -> Model:
    cfg = load_config(preset=preset)
    ctx = strategy_context(cfg, build(cfg))
    return Model(ctx.workload, ctx.round_overhead_s, theory.update_law(ctx.client_optimizer),
                 ctx.rank, ctx.q_default, cfg.federation.participants, cfg.data.num_clients)


def predicted_speedups(model: Model, system: wireless.SystemConfig, num_clients: int,
                       payload: float, draws: int, g2: float, signal: float) -> np.ndarray:
    """(draws,) predicted speedups of the solver's plan over its best baseline, one per network
    draw (the run's expected participants kept, so ``q`` of the baselines is ``K / N``).
    The only place this script calls the solver."""
    workload = dataclasses.replace(
        model.workload, payload_bits_full_rank=payload * model.workload.payload_bits_full_rank,
        lora_flops_per_step_full_rank=payload * model.workload.lora_flops_per_step_full_rank)
    q = min(1.0, model.participants / num_clients)
    cfg = solver_lib.SolverConfig(rank=model.rank, q_min=min(0.05, q), baseline_q=q)
    weights = np.full(num_clients, 1.0 / num_clients)
    problems = [solver_lib.make_problem(
        wireless.generate_profile(jax.random.key(d), num_clients, system), system, workload,
        np.full(num_clients, g2), weights, 1.0 / signal, 1.0, law=model.law,
        overhead_s=model.overhead_s) for d in range(draws)]
    batch = jax.tree.map(lambda *x: np.stack(x), *problems)
    result = solver_lib.solve_batch(batch, jax.random.split(jax.random.key(0), draws), cfg)
    best = np.min([np.asarray(b["objective"]) for b in result.baselines.values()], axis=0)
    return best / np.asarray(result.objective)


MAPS = {  # name: (x setting, x values, y setting, y values)
    "bandwidth_x_compute_spread": ("bandwidth_hz", [0.1e6, 0.3e6, 1e6, 3e6, 10e6, 30e6, 100e6],
                                   "flops_log_sigma", [0.0, 0.25, 0.5, 1.0, 1.5]),
    "cell_radius_x_clients": ("cell_radius_m", [100.0, 250.0, 500.0, 1000.0, 2000.0],
                              "num_clients", [8, 16, 32, 64]),
    "payload_x_compute_spread": ("payload", [0.25, 1.0, 4.0, 16.0, 64.0],
                                 "flops_log_sigma", [0.0, 0.25, 0.5, 1.0, 1.5]),
}
QUICK = {"bandwidth_x_compute_spread": ([1e6, 10e6], [0.0, 1.0]),
         "cell_radius_x_clients": ([250.0, 1000.0], [16]),
         "payload_x_compute_spread": ([1.0, 16.0], [0.5])}


def cell(point: dict, num_clients: int) -> tuple[wireless.SystemConfig, int, float]:
    """A map cell ``{setting: value}`` as (system, number of clients, payload factor): the
    ``SystemConfig`` fields it names over the defaults, ``num_clients`` (default: the preset's
    ``num_clients``) and ``payload`` (default 1)."""
    point = dict(point)
    n = int(point.pop("num_clients", num_clients))
    payload = float(point.pop("payload", 1.0))
    return dataclasses.replace(wireless.SystemConfig(), **point), n, payload


def sweep(model: Model, name: str, xs, ys, draws: int, g2: float, signal: float) -> np.ndarray:
    """(len(ys), len(xs), draws) predicted speedups of one map."""
    x_key, _, y_key, _ = MAPS[name]
    out = np.empty((len(ys), len(xs), draws))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            out[i, j] = predicted_speedups(model, *cell({x_key: x, y_key: y}, model.num_clients),
                                              draws, g2, signal)
    return out


def draw(maps: dict[str, dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 4.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        med = np.median(np.asarray(m["speedup"]), axis=-1)
        image = ax.imshow(med, origin="lower", cmap="viridis", vmin=1.0,
                          vmax=max(1.5, float(med.max())), aspect="auto")
        ax.set_xticks(range(len(m["x"])), [f"{v:g}" for v in m["x"]], rotation=45)
        ax.set_yticks(range(len(m["y"])), [f"{v:g}" for v in m["y"]])
        ax.set_xlabel(m["x_key"])
        ax.set_ylabel(m["y_key"])
        for (i, j), v in np.ndenumerate(med):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.5 * (1 + med.max()) else "black")
        fig.colorbar(image, ax=ax, label="predicted speedup (best baseline J / adaptive J)")
    fig.suptitle("Predicted speedup of adaptive over the best fixed baseline (median of draws)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/regime_map", help="folder for regime_map.json/.png")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--draws", type=int, default=3, help="network draws per cell")
    p.add_argument("--g2", type=float, default=G2)
    p.add_argument("--signal", type=float, default=SIGNAL)
    p.add_argument("--quick", action="store_true", help="a few cells only (a smoke run)")
    args = p.parse_args(argv)
    if args.draws < 1 or not (args.g2 > 0 and args.signal > 0):
        p.error("--draws must be >= 1 and --g2, --signal > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = model_of(args.preset)
    maps = {}
    for name, (x_key, xs, y_key, ys) in MAPS.items():
        xs, ys = QUICK[name] if args.quick else (xs, ys)
        speedup = sweep(model, name, xs, ys, args.draws, args.g2, args.signal)
        maps[name] = {"x_key": x_key, "x": xs, "y_key": y_key, "y": ys,
                      "speedup": speedup.tolist()}
        print(f"{name}: median predicted speedup {np.median(speedup):.3f} "
              f"(min {speedup.min():.3f}, max {speedup.max():.3f})", flush=True)
    record = {"preset": args.preset, "draws": args.draws, "g2": args.g2, "signal": args.signal,
              "host_s": round(time.perf_counter() - start, 1), "load_average": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "maps": maps}
    (out / "regime_map.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {draw(maps, out / 'regime_map.png')} and regime_map.json "
          f"({record['host_s']} s)")


if __name__ == "__main__":
    main()
