"""Named settings (``fedlora-jax run --preset NAME``): nested overrides of :class:`RunConfig`'s
defaults, applied before a config file and ``--set``.

A value :data:`REQUIRED` marks a setting the preset cannot supply (a local model or data file);
:func:`fedlora_jax.config.load_config` refuses to build the config until it is given.
"""

from __future__ import annotations

import copy
import dataclasses

REQUIRED = "<required>"
# Plain FedAvg on the server and strategy ``fixed`` (the papers' settings as configured, and the
# tiny preset's results); the default task's server momentum smooths its non-IID rounds and its
# strategy is ``adaptive`` (docs/results.md, sections 4-5).
FEDAVG = {"name": "sgd", "learning_rate": 1.0, "momentum": 0.9}


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    values: dict
    hints: dict[str, str] = dataclasses.field(default_factory=dict)  # required key -> how to set it


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "all-MiniLM-L6-v2 on Python's documentation (160-character passages, 7 chapters), 10 "
        "clients split by topic, strategy adaptive (the paper's plan of q_n and k_n; 5 expected "
        "per round, rank 8 before it plans), 20 rounds (the embedded, offline default)",
        {}),
    "tiny": Preset(
        "tiny random-init transformer on synthetic 4-class data, 16 clients, 4 per round, "
        "sequence length 16, rank 4, strategy fixed, 10 rounds: seconds on a CPU, for tests and "
        "notebooks",
        {"model": {"source": "tiny"},
         "data": {"source": "synthetic", "partition": "iid", "num_clients": 16, "max_length": 16,
                  "heldout_fraction": 0.2},
         "lora": {"rank": 4, "alpha": 8.0},
         "client": {"local_steps": 2, "batch_size": 4},
         "federation": {"rounds": 10, "participants": 4.0, "chunk_size": 4, "sketch_ratio": 0.5},
         "server_optimizer": FEDAVG, "strategy": "fixed", "eval_every": 5}),
    "fslora-glue": Preset(
        "FSLoRA's GLUE setting: a RoBERTa-style encoder classifier (--model DIR), LoRA rank 64 on "
        "query/value, sketch ratio 1/8 (the paper sweeps 1/8, 1/4, 1/2: "
        "--set federation.sketch_ratio=0.25), Dirichlet(0.5) label split over 20 clients",
        {"model": {"source": REQUIRED},
         "data": {"partition": "dirichlet", "alpha": 0.5, "num_clients": 20, "max_length": 128},
         "lora": {"rank": 64, "alpha": 128.0, "targets": ["query", "value"],
                  "modules_to_save": ["classifier"]},
         "client": {"local_steps": 10, "batch_size": 16},
         "client_optimizer": {"name": "adamw", "learning_rate": 5e-4}, "server_optimizer": FEDAVG,
         "strategy": "fixed",
         "federation": {"rounds": 100, "participants": 5.0, "chunk_size": 5,
                        "sketch_ratio": 0.125}},
        {"model.source": "--model DIR (a local RoBERTa/BERT Hugging Face directory)"}),
    "fslora-commonsense": Preset(
        "FSLoRA's commonsense setting: a LLaMA-family model (--model DIR) on a local data file "
        "(--data FILE), 50 clients with a Dirichlet(0.1) split, 10 sampled per round, 20 local "
        "steps, LoRA rank 32 on the attention projections, sketch ratio 1/2",
        {"model": {"source": REQUIRED, "dtype": "bfloat16"},
         "data": {"source": REQUIRED, "partition": "dirichlet", "alpha": 0.1, "num_clients": 50,
                  "max_length": 256},
         "lora": {"rank": 32, "alpha": 64.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                  "modules_to_save": []},
         "client": {"local_steps": 20, "batch_size": 4},
         "client_optimizer": {"name": "adamw", "learning_rate": 3e-4}, "server_optimizer": FEDAVG,
         "strategy": "fixed",
         "federation": {"rounds": 100, "participants": 10.0, "sampling": "uniform",
                        "chunk_size": 10, "sketch_ratio": 0.5}},
        {"model.source": "--model DIR (a local LLaMA/Qwen/Mistral Hugging Face directory)",
         "data.source": "--data FILE"}),
}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}.")
    return PRESETS[name]


def values(name: str) -> dict:
    """A copy of the preset's nested settings (safe to merge into)."""
    return copy.deepcopy(get(name).values)


def missing(name: str, settings: dict) -> list[str]:
    """The preset's required keys that ``settings`` (nested, after all overrides) still lacks."""
    def lookup(dotted: str):
        node = settings
        for key in dotted.split("."):
            node = node[key]
        return node
    return [f"{key}: set {hint}" for key, hint in get(name).hints.items() if lookup(key) == REQUIRED]
