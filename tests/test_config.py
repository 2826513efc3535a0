"""Run configuration: files and ``--set`` into frozen dataclasses, strict validation, presets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fedlora_jax import presets
from fedlora_jax.config import RunConfig, load_config, to_dict


@pytest.mark.parametrize("override, message", [
    ("federation.sketch_raito=0.5", "Did you mean 'federation.sketch_ratio'?"),
    ("federaton.rounds=3", "Did you mean 'federation'?"),
    ("client_optimizer.learnig_rate=0.1", "Did you mean 'client_optimizer.learning_rate'?"),
    ("eval_evry=2", "Did you mean 'eval_every'?"),
])
def test_unknown_key_names_the_closest(override, message):
    with pytest.raises(ValueError, match="Unknown config key") as e:
        load_config(overrides=[override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("federation.rounds=abc", "federation.rounds must be an integer, got 'abc'"),
    ("federation.rounds=2.5", "federation.rounds must be an integer"),
    ("lora.targets=7", "lora.targets must be a list"),
    ("federation.shared_sketch=maybe", "federation.shared_sketch must be true or false"),
    ("federation.sketch_ratio=1.5", "federation.sketch_ratio must be in (0, 1], got 1.5"),
    ("federation.participants=0", "federation.participants must be > 0"),
    ("data.heldout_fraction=1", "data.heldout_fraction must be in (0, 1)"),
    ("client.local_steps=0", "client.local_steps must be a positive integer"),
    ("client_optimizer.learning_rate=-1", "client_optimizer: learning_rate must be > 0"),
    ("checkpoint_every=-1", "checkpoint_every must be an integer >= 0"),
    ("eval_every=0", "eval_every must be a positive integer"),
])
def test_bad_value_names_field_and_allowed_range(override, message):
    with pytest.raises(ValueError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_error_in_a_file_names_the_field(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("[federation]\nrounds = 3\nsketch_ratio = 2.0\n")
    with pytest.raises(ValueError, match=r"federation.sketch_ratio must be in \(0, 1\]"):
        load_config(str(file))


def test_toml_yaml_and_set_layer_in_order(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('strategy = "fixed"\neval_every = 2\n'
                    '[federation]\nrounds = 3\nsketch_ratio = 0.25\n'
                    '[lora]\ntargets = ["query"]\n')
    yml = tmp_path / "run.yaml"
    yml.write_text("strategy: fixed\neval_every: 2\n"
                   "federation:\n  rounds: 3\n  sketch_ratio: 0.25\n"
                   "lora:\n  targets: [query]\n")
    a, b = load_config(str(toml)), load_config(str(yml))
    assert a == b
    assert (a.federation.rounds, a.federation.sketch_ratio, a.lora.targets) == (3, 0.25, ("query",))
    assert a.federation.chunk_size == RunConfig().federation.chunk_size  # untouched defaults stay
    c = load_config(str(toml), ["federation.rounds=7"], preset="tiny")
    assert c.federation.rounds == 7 and c.model.source == "tiny" and c.eval_every == 2


def test_config_is_frozen_and_its_saved_json_reloads(tmp_path):
    cfg = load_config(preset="tiny", overrides=["federation.block_size=2"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.federation.rounds = 3
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(to_dict(cfg)))
    assert load_config(str(saved)) == cfg


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_build_once_their_required_settings_are_given(name):
    preset = presets.get(name)
    given = [f"{key}=/some/dir" for key in preset.hints]
    cfg = load_config(overrides=given, preset=name)
    assert isinstance(cfg, RunConfig)
    for key in preset.hints:
        with pytest.raises(ValueError, match=f"needs: {key}: set --"):
            load_config(overrides=[g for g in given if not g.startswith(key)], preset=name)


def test_paper_presets_hold_the_paper_settings():
    glue = load_config(overrides=["model.source=/m"], preset="fslora-glue")
    assert glue.lora.rank == 64 and glue.federation.sketch_ratio == 1 / 8
    cs = load_config(overrides=["model.source=/m", "data.source=/d.jsonl"],
                     preset="fslora-commonsense")
    assert (cs.data.num_clients, cs.federation.participants, cs.client.local_steps,
            cs.data.partition, cs.data.alpha) == (50, 10.0, 20, "dirichlet", 0.1)


def test_unknown_preset_lists_them():
    with pytest.raises(ValueError, match="available: default, tiny"):
        load_config(preset="tiniest")


def test_cli_validates_everything_before_running(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "fedlora_jax.cli", "run", "--preset", "tiny",
                           "--output-dir", str(out), "--set", "federation.rounds=2",
                           "--set", "lora.rank=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lora.rank must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_strategy_options_set_a_strategys_parameters_and_typos_name_the_closest():
    from fedlora_jax import strategies

    cfg = load_config(None, ["strategy=hetlora", "strategy_options.ratios=[0.25,0.5]",
                             "strategy_options.prune_below=0"])
    strategy = strategies.strategy_of(cfg)
    assert (strategy.name, strategy.ratios, strategy.prune_below) == ("hetlora", (0.25, 0.5), 0.0)
    assert strategies.strategy_of(load_config(None, ["strategy=luo"])).sampling_only  # kept
    with pytest.raises(ValueError, match="Did you mean 'strategy_options.pilot_rounds'"):
        load_config(None, ["strategy=adaptive", "strategy_options.pilot_round=3"])
    with pytest.raises(ValueError, match="strategy_options.pilot_rounds must be an integer"):
        load_config(None, ["strategy=adaptive", "strategy_options.pilot_rounds=x"])
    with pytest.raises(ValueError, match="hetlora ratios must be"):
        load_config(None, ["strategy=hetlora", "strategy_options.ratios=[2.0]"])
    with pytest.raises(ValueError, match="strategy_options must be a table"):
        load_config(None, ["strategy_options=3"])


def test_a_data_file_is_stored_absolute_and_split_iid_unless_told(tmp_path, monkeypatch):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t0\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["data.source=train.tsv"])
    assert cfg.data.source == str(tmp_path / "train.tsv")  # resumable from another directory
    assert cfg.data.partition == "iid"  # the file names no owners: no partition setting needed
    assert load_config(overrides=["data.source=train.tsv",
                                  "data.partition=dirichlet"]).data.partition == "dirichlet"


def test_participants_above_clients_is_refused_not_clamped():
    with pytest.raises(ValueError, match="participants=12 exceeds data.num_clients=8"):
        load_config(overrides=["data.num_clients=8", "federation.participants=12"])


def test_a_presets_own_settings_never_contradict_a_strategy():
    """Contradictions are changes from the preset (or a resumed run's config), not from the
    defaults: tiny's 4 participants suit 'full', which refuses only a participants setting."""
    cfg = load_config(preset="tiny", overrides=["strategy=full"])
    assert cfg.federation.sampling == "full"
    resumed = load_config(base=cfg, overrides=["federation.rounds=20"])
    assert resumed.federation.rounds == 20 and resumed.strategy == "full"
    with pytest.raises(ValueError, match="participants=2.0 contradicts strategy 'full'"):
        load_config(base=cfg, overrides=["federation.participants=2"])


@pytest.mark.parametrize("name, text, where", [
    ("bad.yaml", "federation:\n  rounds: 3\n sketch_ratio: 2\n", "bad.yaml, line 3, column 2"),
    ("bad.toml", "[federation]\nrounds = \n", "bad.toml: invalid TOML"),
    ("bad.json", '{"federation": {"rounds": 3,}}', "bad.json, line 1, column 29"),
    ("list.yaml", "- 1\n- 2\n", "must hold a table of settings"),
])
def test_a_malformed_config_file_names_file_and_line(tmp_path, name, text, where):
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(str(file))
    assert where in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
