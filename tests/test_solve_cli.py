"""``fedlora-jax solve`` end to end in a subprocess."""

import importlib.util
import json
import subprocess
import sys

# Until commands/run.py lands, drive the same entry point with only ``solve`` registered.
if importlib.util.find_spec("fedlora_jax.commands.run") is not None:
    CLI = [sys.executable, "-m", "fedlora_jax.cli"]
else:
    CLI = [sys.executable, "-c", "import sys; from fedlora_jax import cli; cli.COMMANDS = ('solve',); "
                                 "sys.exit(cli.main())"]


def _run(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


def test_help_has_example():
    out = _run("solve", "--help")
    assert out.returncode == 0 and "example:" in out.stdout and "--bandwidth-mhz" in out.stdout


def test_solve_writes_allocation(tmp_path):
    out = _run("solve", "--clients", "6", "--rank", "4", "--seed", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "allocation.json").read_text())
    assert len(record["q"]) == 6 and set(record["summary"]) == {"adaptive", "uniform", "fixed_ratio", "full"}
    assert record["summary"]["adaptive"]["objective"] <= record["summary"]["uniform"]["objective"]
    assert (tmp_path / "allocation.png").stat().st_size > 0
    assert "adaptive" in out.stdout


def test_bad_input_is_one_clear_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("flops_per_s,rate_kbps\n1e12,nan\n")
    out = _run("solve", "--profile", str(trace), "--out", str(tmp_path))
    assert out.returncode == 2 and "rate_kbps" in out.stderr and "Traceback" not in out.stderr


import pytest  # noqa: E402

from fedlora_jax import cli  # noqa: E402


@pytest.mark.parametrize("flag, value, field", [
    ("--rank", "0", "rank"), ("--q-min", "0", "q_min"), ("--bandwidth-mhz", "0", "--bandwidth-mhz"),
    ("--clients", "0", "--clients"), ("--local-steps", "0", "--local-steps"),
    ("--lora-params", "-1", "--lora-params"), ("--round-overhead-s", "-1", "overhead_s"),
    ("--min-round-s", "nan", "min_round_s"), ("--beta", "0", "beta")])
def test_bad_inputs_are_one_line_exit_2_before_any_work(tmp_path, capsys, flag, value, field):
    out = tmp_path / "out"
    code = cli.main(["solve", "--clients", "4", flag, value, "--out", str(out)])  # the last value wins
    err = capsys.readouterr().err
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing written
