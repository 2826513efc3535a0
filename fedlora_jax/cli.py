"""``fedlora-jax`` command line: one subcommand per module in :mod:`fedlora_jax.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``register(subparsers)`` which adds its parser and sets ``func``.
COMMANDS = ("run", "compare", "sweep", "solve", "bench", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora-jax",
        description="Vectorized simulator of adaptive federated sketched LoRA over heterogeneous "
                    "wireless networks (arXiv 2505.23555).",
        epilog="Run 'fedlora-jax COMMAND --help' for the options and an example of each command.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fedlora_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        if args.debug:
            raise
        print(f"fedlora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
