"""``fedlora-jax bench``: run the repository's benchmark scripts (``benchmarks/*.py``) by name."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

from fedlora_jax.fields import closest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

EPILOG = """examples:
  fedlora-jax bench                                  # list the benchmarks
  fedlora-jax bench solver_scaling --quick
  fedlora-jax bench engine_throughput model_memory --quick --json runs/bench

Each benchmark runs as 'python benchmarks/NAME.py' with --quick passed through; --json DIR
passes --json DIR/NAME.json. The scripts ship with the repository (not with a wheel).
"""


def available() -> dict[str, str]:
    """Benchmark name -> first line of its docstring (read without importing it). A benchmark is
    a script (it has an ``if __name__ == "__main__":`` block); helper modules are not listed."""
    if not BENCHMARKS.is_dir():
        raise FileNotFoundError(f"No benchmarks/ directory at {BENCHMARKS}: the benchmark "
                                "scripts ship with the repository checkout.")
    modules = {path.stem: ast.parse(path.read_text()) for path in sorted(BENCHMARKS.glob("*.py"))}
    return {name: (ast.get_docstring(tree) or "").split("\n")[0]
            for name, tree in modules.items() if _is_script(tree)}


def _is_script(tree: ast.Module) -> bool:
    """Whether the module runs something as ``__main__``."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
               for node in tree.body)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run (or list) the benchmarks in benchmarks/",
        description="Runs benchmark scripts by name, one after the other; with no name, lists "
                    "them.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run, or 'all'")
    p.add_argument("--quick", action="store_true", help="each benchmark's small grid (~1 min)")
    p.add_argument("--json", type=Path, metavar="DIR", help="write DIR/NAME.json per benchmark")
    p.set_defaults(func=main)


def command(name: str, quick: bool, json_dir: Path | None) -> list[str]:
    """The command line that runs benchmark ``name``."""
    return ([sys.executable, str(BENCHMARKS / f"{name}.py")] + (["--quick"] if quick else [])
            + (["--json", str(json_dir / f"{name}.json")] if json_dir else []))


def main(args: argparse.Namespace) -> int:
    found = available()
    if not args.names:
        width = max(map(len, found), default=0)
        print("\n".join(f"{name:<{width}}  {doc}" for name, doc in found.items()))
        return 0
    names = list(found) if args.names == ["all"] else args.names
    for name in names:
        if name not in found:
            raise ValueError(f"Unknown benchmark {name!r}.{closest(name, found, listing='benchmarks')}")
    if args.json:
        args.json.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"== {name}", flush=True)
        code = subprocess.run(command(name, args.quick, args.json)).returncode
        if code:
            print(f"benchmark {name} failed with exit code {code}", file=sys.stderr)
            return code
    return 0
