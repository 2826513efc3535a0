"""``fedlora-jax sweep``: a grid of runs over clients, participants, network and sketch settings.

Every grid point is one run of the base config (the ``tiny`` preset with synthetic data by
default) with the point's overrides and its own seed, derived from the point's settings, so a
point's result does not depend on the rest of the grid. Points whose shapes allow train as packs
of runs in one compiled program (:func:`fedlora_jax.train.train_all`; ``--no-pack``: one by one).
Each point gets ``OUTPUT_DIR/points/POINT/result.json`` when its run (or pack) finishes; a rerun
skips the points that have one from a run of the same settings and code (resumable), and reruns
the others. The table of all points goes to
``OUTPUT_DIR/sweep.csv`` and ``sweep.json``, the plot to ``sweep.png``. Every point's config is
validated before the first run starts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

from fedlora_jax.fields import closest

EXAMPLE = textwrap.dedent("""\
    examples:
      fedlora-jax sweep --grid clients=100,10000,1000000 --rounds 2
      fedlora-jax sweep --grid participants=4,16,64 --grid sketch_ratio=0.25,0.5,1
      fedlora-jax sweep --grid bandwidth=1e6,10e6 --grid heterogeneity=0,0.5,1
      fedlora-jax sweep --grid strategy=fixed,fslora,adaptive --grid participants=8,32
      fedlora-jax sweep --preset default --grid sketch_ratio=0.25,1 --output-dir runs/sweep_minilm

    Rerunning the same command skips the points already finished.

    Packing: points that differ only in participants, sketch_ratio, bandwidth, heterogeneity,
    seed and a strategy of the same aggregation rule (fixed, fedit, fslora, adaptive) train as
    one compiled program (up to 16 points a pack; each keeps its own folder and results equal
    to its run alone's up to float round-off). Points of different client counts, or of
    strategies with their own rule or model change (hetlora, flexlora, flora, ffa), form
    separate packs; fedsa never packs. --no-pack trains every point on its own.""")


@dataclasses.dataclass(frozen=True)
class Axis:
    """A grid key: the config setting it sets and how one value parses."""

    path: str
    parse: Callable[[str], object]
    help: str


def _int(text: str) -> int:
    value = float(text)
    if value != int(value):
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


AXES: dict[str, Axis] = {
    "clients": Axis("data.num_clients", _int, "registered clients N"),
    "participants": Axis("federation.participants", float, "expected participants per round"),
    "bandwidth": Axis("system.bandwidth_hz", float, "total uplink bandwidth (Hz)"),
    "heterogeneity": Axis("system.flops_log_sigma", float,
                          "std of log compute speed across clients (0: identical devices)"),
    "sketch_ratio": Axis("federation.sketch_ratio", float, "kept fraction rho = k/r of the rank"),
    "strategy": Axis("strategy", str, "a registered strategy (fedlora_jax.strategies)"),
}

DEFAULT_GRID = {"clients": "100,1000,10000,100000,1000000"}
BASE_OVERRIDES = ("strategy=fixed", "data.synthetic_per_client=2", "federation.rounds=5", "federation.chunk_size=8",
                  "federation.participants=16")
LOG_AXES = ("clients", "participants", "bandwidth")
HELDOUT = 2048  # held-out examples per point, at most (the fraction shrinks as clients grow)
COLUMNS = ("point", "seed", "rounds", "mean_participants", "final_eval_accuracy",
           "final_eval_loss", "final_train_loss", "sim_clock_s", "uplink_params", "wall_s")


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["clients=100,1e6", ...]`` -> ``{"clients": [100, 1000000], ...}``; an unknown key names
    the closest valid one."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r} must look like KEY=V1,V2,...")
        if key not in AXES:
            raise ValueError(f"Unknown grid key {key!r}.{closest(key, AXES, listing='keys')}")
        if key in grid:
            raise ValueError(f"Grid key {key!r} is given twice.")
        try:
            grid[key] = [AXES[key].parse(v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"--grid {key}: {e}.") from None
    return grid


def points(grid: dict[str, list]) -> list[dict]:
    """The cartesian product of the grid, in the order the keys were given."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(point: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items())


def point_seed(point: dict, base: int) -> int:
    """A seed fixed by the point's settings (not by its position in the grid)."""
    return (base + zlib.crc32(point_name(point).encode())) % 2**31


def point_overrides(point: dict, seed: int, out: Path) -> list[str]:
    overrides = [f"{AXES[k].path}={v}" for k, v in point.items()]
    overrides += [f"federation.seed={seed}", f"output_dir={out}"]
    return overrides


def _cap_heldout(cfg):
    """Synthetic data: at most :data:`HELDOUT` held-out examples, whatever the number of clients."""
    total = cfg.data.num_clients * cfg.data.synthetic_per_client
    fraction = min(cfg.data.heldout_fraction, HELDOUT / total)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, heldout_fraction=fraction))


def plan(args) -> list[tuple[dict, object]]:
    """Every point with its validated :class:`RunConfig`; raises before anything runs."""
    from fedlora_jax.config import load_config

    grid = parse_grid(args.grid or [f"{k}={v}" for k, v in DEFAULT_GRID.items()])
    base = list(BASE_OVERRIDES) + ([f"federation.rounds={args.rounds}"] if args.rounds else [])
    out = Path(args.output_dir) / "points"
    planned = []
    for point in points(grid):
        overrides = (base + args.overrides +
                     point_overrides(point, point_seed(point, args.seed), out / point_name(point)))
        cfg = load_config(args.config, overrides, preset=args.preset)
        planned.append((point, _cap_heldout(cfg) if cfg.data.source == "synthetic" else cfg))
    return planned


def result_row(point: dict, cfg, history: list[dict]) -> dict:
    """A finished point's table row, from its metrics rows."""
    rounds = [h for h in history if "participants" in h]
    last = history[-1]
    return {**point, "point": point_name(point), "seed": cfg.federation.seed,
            "rounds": len(rounds),
            "mean_participants": sum(h["participants"] for h in rounds) / max(len(rounds), 1),
            "final_eval_accuracy": last.get("eval_accuracy"),
            "final_eval_loss": last.get("eval_loss"),
            "final_train_loss": last.get("train_loss"), "sim_clock_s": last.get("sim_clock_s", 0.0),
            "uplink_params": sum(h["uplink_params"] for h in rounds),
            "wall_s": last.get("elapsed_s", 0.0)}


def done(cfg) -> bool:
    """A point finished before: its ``result.json`` is there and its run finished with the same
    settings and code (:func:`fedlora_jax.rundir.finished_rows`)."""
    from fedlora_jax import rundir

    return (Path(cfg.output_dir) / "result.json").is_file() and bool(rundir.finished_rows(cfg))


def run_points(planned: list[tuple[dict, object]], *, pack: bool = True, log=print) -> None:
    """Trains the points not :func:`done` (packed where they allow:
    :func:`fedlora_jax.train.train_all`) and writes their ``result.json``."""
    from fedlora_jax.train import train_all

    todo = [(point, cfg) for point, cfg in planned if not done(cfg)]
    histories = train_all([cfg for _, cfg in todo], pack=pack, log=log)
    for (point, cfg), history in zip(todo, histories):
        (Path(cfg.output_dir) / "result.json").write_text(
            json.dumps(result_row(point, cfg, history)))


def write_table(rows: list[dict], keys: list[str], out: Path) -> None:
    columns = keys + list(COLUMNS)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))


def plot(rows: list[dict], keys: list[str], path: Path) -> Path:
    """Final accuracy and simulated wall-clock against the first grid key, one line per setting of
    the other keys."""
    from fedlora_jax.metrics import pyplot, log_x_axis

    plt = pyplot()
    x_key, others = keys[0], keys[1:]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for group, members in itertools.groupby(sorted(rows, key=lambda r: [str(r[k]) for k in others]),
                                            key=lambda r: tuple(r[k] for k in others)):
        members = sorted(members, key=lambda r: (isinstance(r[x_key], str), r[x_key]))
        label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or None
        xs = [r[x_key] for r in members]
        axes[0].plot(xs, [r["final_eval_accuracy"] for r in members], "o-", label=label)
        axes[1].plot(xs, [r["sim_clock_s"] for r in members], "o-", label=label)
    for ax, y in zip(axes, ("final held-out accuracy", "simulated wall-clock (s)")):
        ax.set_xlabel(x_key)
        ax.set_ylabel(y)
        if x_key in LOG_AXES:
            points = [r[x_key] for r in rows]
            log_x_axis(ax, points, ticks=points)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def register(subparsers) -> None:
    keys = "\n".join(f"  {k:<14} {a.help} ({a.path})" for k, a in AXES.items())
    p = subparsers.add_parser(
        "sweep", help="run a grid of federated runs; one table and plot",
        description="Runs every point of a grid (a cartesian product of --grid keys) as one "
                    "federated run with its own seed; tiny model and synthetic data unless "
                    f"--preset/--config/--set say otherwise.\n\ngrid keys:\n{keys}",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help=f"one grid axis (repeatable; default {DEFAULT_GRID})")
    p.add_argument("--preset", default="tiny", help="base settings (default tiny)")
    p.add_argument("--config", help="TOML, YAML or JSON file of base settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of every point (repeatable)")
    p.add_argument("--rounds", type=int, help="rounds per point (default 5)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each point derives its own")
    p.add_argument("--output-dir", default="runs/sweep", help="default runs/sweep")
    p.add_argument("--no-pack", action="store_true",
                   help="train every point on its own (default: packed where shapes allow)")
    p.set_defaults(func=main)


def main(args) -> int:
    planned = plan(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(planned[0][0])
    for i, (point, cfg) in enumerate(planned, 1):
        print(f"[{i}/{len(planned)}] {point_name(point)}" + (" (done, skipped)" if done(cfg) else ""),
              flush=True)
    run_points(planned, pack=not args.no_pack,
               log=lambda line: print(f"sweep: {line}", flush=True))
    rows = [json.loads((Path(cfg.output_dir) / "result.json").read_text()) for _, cfg in planned]
    write_table(rows, keys, out)
    plot(rows, keys, out / "sweep.png")
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0
