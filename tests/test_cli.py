"""The command line as a new user meets it, driven in subprocesses (``python -m fedlora_jax.cli``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora_jax import cli, metrics
from tests import compile_cache

CLI = [sys.executable, "-m", "fedlora_jax.cli"]
TINY = ["--preset", "tiny", "--set", "data.num_clients=8", "--set", "eval_every=2"]


def _cli(*args, timeout=300):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def test_registry_lists_exactly_the_command_modules():
    modules = {p.stem for p in (Path(cli.__file__).parent / "commands").glob("*.py")
               if not p.name.startswith("_")}
    assert set(cli.COMMANDS) == modules


def test_top_level_help_lists_every_command():
    out = _cli("--help")
    assert out.returncode == 0
    assert all(name in out.stdout for name in cli.COMMANDS)


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_command_help_explains_options_and_shows_an_example(name):
    out = _cli(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "example" in out.stdout and f"fedlora-jax {name}" in out.stdout
    assert out.stdout.count("--") >= 2  # documented options


def _examples(name: str) -> list[list[str]]:
    """The example command lines of ``name``'s help, without comments and shell redirections."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    lines = [line.split("#")[0].strip() for line in sub.epilog.splitlines()]
    argvs = [shlex.split(line.split(" > ")[0]) for line in lines if line.startswith("fedlora-jax ")]
    assert argvs, f"{name} --help shows no example"
    return [argv[1:] for argv in argvs]


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_help_examples_parse(name):
    parser = cli.build_parser()
    for argv in _examples(name):
        args = parser.parse_args(argv)
        assert args.command == name and callable(args.func)


def test_readme_commands_parse():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    lines = [line.split("#")[0].strip() for line in readme.read_text().splitlines()]
    argvs = [shlex.split(line)[1:] for line in lines if line.startswith("fedlora-jax ")]
    assert len(argvs) >= 5
    parser = cli.build_parser()
    for argv in (a for a in argvs if "--help" not in a):
        assert callable(parser.parse_args(argv).func)


def test_bench_lists_and_rejects_unknown_names(capsys):
    assert cli.main(["bench"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "solver_scaling" in listed and "common" not in listed  # a helper, not a benchmark
    assert cli.main(["bench", "solver_scalin"]) == 2
    assert "Did you mean 'solver_scaling'?" in capsys.readouterr().err


def test_run_jsonl_then_resume_then_plot(tmp_path):
    compile_cache.enable()
    run_dir = tmp_path / "run"
    out = _cli("run", *TINY, "--rounds", 2, "--jsonl", "--output-dir", run_dir)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]  # stdout is JSON lines only
    assert [e["event"] for e in events] == ["config", "round", "round", "done"]
    assert events[0]["config"]["model"]["source"] == "tiny"
    assert {"round", "participants", "train_loss", "sim_clock_s", "total_rounds"} <= events[1].keys()
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "learning_curves.png",
                 "round_times.png", "allocation.png"):
        assert (run_dir / name).stat().st_size > 0, name

    out = _cli("run", "--resume", "--output-dir", run_dir, "--rounds", 3, "--quiet")
    assert out.returncode == 0, out.stderr
    assert "resumed from the checkpoint of round 2" in out.stdout
    m = metrics.load_metrics(run_dir)
    assert m["round"].tolist() == [0, 1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["federation"]["rounds"] == 3

    out = _cli("plot", run_dir, "--out", tmp_path / "figures")
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        "metrics.csv", "learning_curves.png", "round_times.png", "allocation.png"}


def test_resume_without_a_run_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["run", "--resume", "--output-dir", str(tmp_path / "nothing")]) == 2
    assert "Nothing to resume" in capsys.readouterr().err


def test_device_scaling_benchmark_imports_before_jax():
    """device_scaling must set XLA_FLAGS before jax is imported: nothing it imports at module
    level (benchmarks/common.py included) may import jax."""
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import device_scaling; "
            "assert 'jax' not in sys.modules, 'jax imported at module level'")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
