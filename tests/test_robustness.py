"""Runs that cannot be corrupted: an output folder owned by one run, resume that checks its config,
and bad input refused in one line (exit 2) before anything is built or written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora_jax import cli, metrics, rundir
from fedlora_jax.config import RunConfig, from_dict, load_config, to_dict
from fedlora_jax.train import Diverged, train
from tests import compile_cache

TINY = ["--preset", "tiny", "--set", "data.num_clients=8", "--set", "eval_every=2"]


@pytest.fixture(scope="module", autouse=True)
def _cache():
    compile_cache.enable()


def _run(*args) -> int:
    return cli.main(["run", *map(str, args)])


def _one_line_error(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-round tiny run (checkpoints at rounds 1 and 2)."""
    out = tmp_path_factory.mktemp("finished")
    assert _run(*TINY, "--rounds", 2, "--set", "checkpoint_every=1", "--output-dir", out,
                "--quiet") == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run, free to change."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_finished_run_is_not_overwritten_without_a_flag(finished, capsys):
    before = _snapshot(finished)
    _one_line_error(capsys, _run(*TINY, "--output-dir", finished),
                    "holds a run already", "--resume", "--overwrite")
    assert _snapshot(finished) == before


def test_a_failed_run_leaves_the_folder_byte_for_byte_unchanged(finished, tmp_path, capsys):
    """--overwrite with a bad data file fails while loading the data: nothing was written yet."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 0}\n{"text": "broken", "label": \n')
    before = _snapshot(finished)
    _one_line_error(capsys, _run("--model", "tiny", "--data", bad, "--output-dir", finished,
                                 "--overwrite"), "bad.jsonl", "line 2")
    assert _snapshot(finished) == before
    _one_line_error(capsys, _run("--resume", "--output-dir", finished, "--set", "lora.rank=8"),
                    "lora.rank 4 -> 8")
    assert _snapshot(finished) == before


def test_a_folder_held_by_a_live_run_is_refused(tmp_path, capsys):
    with rundir.lock(tmp_path):
        _one_line_error(capsys, _run(*TINY, "--output-dir", tmp_path),
                        f"in use by another run (pid {os.getpid()})", "--output-dir")
    assert not (tmp_path / rundir.LOCK_FILE).exists()  # released on exit


def test_a_stale_lock_is_taken_over(tmp_path):
    """A lock file left by a killed run holds no lock: the next run takes the folder."""
    (tmp_path / rundir.LOCK_FILE).write_text("999999999\n")
    assert rundir.holder(tmp_path) is None
    with rundir.lock(tmp_path):
        assert rundir.holder(tmp_path) == str(os.getpid())
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_two_concurrent_runs_on_one_folder(tmp_path):
    """The second run is refused in one line; the first completes with every round once."""
    cli_run = [sys.executable, "-m", "fedlora_jax.cli", "run", *TINY, "--output-dir",
               str(tmp_path), "--quiet"]
    first = subprocess.Popen([*cli_run, "--rounds", "100"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / rundir.LOCK_FILE).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run([*cli_run, "--rounds", "3"], capture_output=True, text=True,
                            timeout=240)
    assert second.returncode == 2, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert ("in use by another run" in second.stderr  # the first still runs ...
            or "holds a run already" in second.stderr)  # ... or finished in the meantime
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [row["round"] for row in metrics.read_rows(tmp_path)] == list(range(101))
    assert json.loads((tmp_path / "config.json").read_text())["federation"]["rounds"] == 100
    assert len(rundir.config_history(tmp_path)) == 1


@pytest.mark.parametrize("option, old, new", [
    (["--model", "minilm"], "'tiny'", "'minilm'"),
    (["--set", "lora.rank=8"], "4", "8"),
    (["--set", "lora.targets=[query]"], "['query', 'value']", "['query']"),
    (["--clients", "4"], "8", "4"),
    (["--data", "builtin"], "'synthetic'", "'builtin'"),
    (["--seed", "3"], "0", "3"),
    (["--set", "data.partition=dirichlet"], "'iid'", "'dirichlet'"),
    (["--strategy", "fedit"], "'fixed'", "'fedit'"),
    (["--set", "client_optimizer.name=sgd"], "'adamw'", "'sgd'"),
], ids=lambda v: v[-1] if isinstance(v, list) else None)
def test_resume_refuses_a_change_of_the_runs_identity(option, old, new, finished, capsys):
    field = {"--model": "model.source", "--clients": "data.num_clients", "--data": "data.source",
             "--seed": "federation.seed", "--strategy": "strategy"}.get(
                 option[0], option[-1].split("=")[0])
    before = _snapshot(finished)
    _one_line_error(capsys, _run("--resume", "--output-dir", finished, *option),
                    f"{field} {old} -> {new}", "Cannot resume")
    assert _snapshot(finished) == before


def test_resume_below_the_checkpoint_round_is_a_clear_error(finished, capsys):
    _one_line_error(capsys, _run("--resume", "--output-dir", finished, "--rounds", 1),
                    "--rounds 1 is below round 2", "give --rounds above 2")


def test_resume_with_allowed_changes_continues_and_records_them(run_copy, capsys):
    code = _run("--resume", "--output-dir", run_copy, "--rounds", 3,
                "--set", "client_optimizer.learning_rate=0.001", "--set", "eval_every=1")
    out, err = capsys.readouterr()
    assert code == 0, err
    header = out.splitlines()[:2]  # a short header, not the whole config
    assert header[0].startswith(f"resuming {run_copy}: model tiny, data synthetic, 8 clients")
    assert header[1] == ("  changed: client_optimizer.learning_rate=0.001, federation.rounds=3, "
                         "eval_every=1")
    assert "classes: 0=class_0, 1=class_1, 2=class_2, 3=class_3" in out  # the label map    assert [row["round"] for row in metrics.read_rows(run_copy)] == [0, 1, 2, 3]
    first, resumed = rundir.config_history(run_copy)
    assert first["from_round"] == 1 and first["changed"] == {}
    assert resumed["from_round"] == 3
    assert resumed["changed"] == {
        "client_optimizer.learning_rate": {"old": 0.005, "new": 0.001},
        "eval_every": {"old": 2, "new": 1}, "federation.rounds": {"old": 2, "new": 3}}
    assert resumed["config"] == json.loads((run_copy / "config.json").read_text())
    assert first["config"]["client_optimizer"]["learning_rate"] == 0.005


def test_divergence_stops_early_naming_the_last_good_checkpoint(run_copy, tmp_path):
    """A learning rate raised on resume blows the loss up in the next round: one clear error
    naming the last good checkpoint; a run that diverges before its first save says so."""
    resumed = load_config(base=from_dict(RunConfig, rundir.saved_config(run_copy)), overrides=[
        "federation.rounds=30", "client_optimizer.learning_rate=1e3", f"output_dir={run_copy}"])
    with pytest.raises(Diverged, match=r"Training diverged in round 3: train loss .* \(bound .*"
                                       r"The last good checkpoint is round 2 in .*checkpoints"):
        train(resumed, progress="none", log=lambda line: None, resume=True)
    fresh = dataclasses.replace(resumed, output_dir=str(tmp_path / "fresh"))
    with pytest.raises(Diverged, match="round 1: .*No checkpoint was saved yet"):
        train(fresh, progress="none", log=lambda line: None)


def test_the_label_map_is_saved(finished):
    assert json.loads((finished / rundir.LABELS_FILE).read_text()) == [
        "class_0", "class_1", "class_2", "class_3"]


def test_mixed_labels_load_once_mapped_explicitly(tmp_path):
    from fedlora_jax.data.loaders import load_classification

    file = _bad_data(tmp_path, "d.json", json.dumps([{"text": "a", "label": "pos"},
                                                     {"text": "b", "label": 0}]))
    with pytest.raises(ValueError, match="mixes text and integer labels"):
        load_classification(file)
    data = load_classification(file, label_names=["neg", "pos"])
    assert data.labels.tolist() == [1, 0] and data.label_names == ("neg", "pos")
    cfg = load_config(overrides=[f"data.source={file}", "data.label_names=[neg,pos]"])
    assert cfg.data.label_names == ("neg", "pos")


def _bad_data(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BAD_INPUT = {
    "malformed-yaml": (lambda d: ["--config", _bad_data(d, "run.yaml", "federation:\n  rounds: 3\n"
                                                        " bad: [1\n")],
                       ["run.yaml, line", "invalid YAML"]),
    "bad-jsonl-line": (lambda d: ["--data", _bad_data(d, "d.jsonl", '{"text": "a", "label": 0}\n'
                                                      '{"text": "b" "label": 1}\n')],
                       ["d.jsonl', line 2, column", "invalid JSON"]),
    "latin-1-file": (lambda d: ["--data", _bad_data(d, "d.csv", "text,label\ngood,0\n"
                                                    "caf\xe9,1\n".encode("latin-1"))],
                     ["d.csv', line 3", "not UTF-8", "re-save"]),
    "mixed-labels": (lambda d: ["--data", _bad_data(d, "d.json", json.dumps(
        [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}]))],
                     ["mixes text and integer labels", "data.label_names"]),
    "empty-label": (lambda d: ["--data", _bad_data(d, "d.csv", "text,label\na,pos\nb,\n")],
                    ["record 1 has an empty label"]),
    "rank-0": (lambda d: ["--set", "lora.rank=0"], ["lora.rank must be a positive integer"]),
    "clients-0": (lambda d: ["--clients", "0"], ["data.num_clients must be a positive integer"]),
    "participants-above-clients": (lambda d: ["--clients", "8",
                                              "--set", "federation.participants=9"],
                                   ["federation.participants=9 exceeds data.num_clients=8"]),
    "q_min-2": (lambda d: ["--strategy", "adaptive", "--set", "strategy_options.q_min=2"],
                ["strategy_options.q_min must be in (0, 1)"]),
    "q_min-0": (lambda d: ["--strategy", "adaptive", "--set", "strategy_options.q_min=0"],
                ["strategy_options.q_min must be in (0, 1)"]),
    "full-with-participants": (lambda d: ["--strategy", "full",
                                          "--set", "federation.participants=2"],
                               ["federation.participants=2.0 contradicts strategy 'full'"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    args, fragments = BAD_INPUT[case]
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--output-dir", out, *args(tmp_path)]
    if "--data" in argv:
        argv += ["--set", "data.text_columns=[text]"]
    _one_line_error(capsys, _run(*argv), *fragments)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("name, text, fragments", [
    ("text-value.csv", "flops_per_s,rate_bps\n1e9,1e6\nfast,2e6\n",
     ["text-value.csv, column 'flops_per_s', line 3", "'fast' is not a number"]),
    ("empty.csv", "", ["empty.csv is empty"]),
])
def test_bad_trace_is_one_line_and_exit_2(name, text, fragments, tmp_path, capsys):
    trace = _bad_data(tmp_path, name, text)
    _one_line_error(capsys, cli.main(["solve", "--profile", str(trace)]), *fragments)


def test_plot_on_a_compare_folder_names_a_run_to_plot(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"strategy": "adaptive", "seed": 0, "round": 0, "eval_loss": 1.0}) + "\n")
    _one_line_error(capsys, cli.main(["plot", str(tmp_path)]), "is a 'fedlora-jax compare' "
                    "folder", str(tmp_path / "adaptive" / "seed0"))


def test_print_config_prints_the_whole_config_and_runs_nothing(tmp_path, capsys):
    assert _run("--preset", "tiny", "--output-dir", tmp_path / "x", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["source"] == "tiny" and printed["lora"]["rank"] == 4
    assert not (tmp_path / "x").exists()


def test_a_run_that_failed_before_its_first_checkpoint_needs_overwrite(tmp_path, capsys):
    cfg = load_config(preset="tiny", overrides=[f"output_dir={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    _one_line_error(capsys, _run("--resume", "--output-dir", tmp_path),
                    "holds no checkpoint; start it again with --overwrite")


def test_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        _run("--resume", "--overwrite")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="lora.rank must be a positive integer"):
        cli.main(["--debug", "run", "--set", "lora.rank=0"])
