"""Hugging Face tensor names and safetensors reading, shared by the model loader
(:mod:`fedlora_jax.models.hf`) and PEFT adapters (:mod:`fedlora_jax.models.peft_io`).

The NNX module trees mirror ``transformers``' module names, so each parameter's Hugging Face tensor
name follows from its NNX path by a few regex rules (:data:`RULES`), each with the transform that
turns the torch tensor into ours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from safetensors import SafetensorError, safe_open

# NNX leaf -> (HF leaf, torch -> NNX transform); nnx.Linear kernels are torch weights transposed.
RULES: tuple[tuple[re.Pattern, str, Callable[[jax.Array], jax.Array]], ...] = (
    (re.compile(r"(.*)\.kernel"), r"\1.weight", lambda w: w.T),
    (re.compile(r"(.*)\.(?:embedding|scale)"), r"\1.weight", lambda w: w),
    (re.compile(r"(.*)\.bias"), r"\1.bias", lambda w: w),
)



def hf_name(path: Sequence, conv1d: Sequence[str] = ()) -> tuple[str, Callable[[jax.Array], jax.Array]]:
    """HF tensor name of the NNX parameter at ``path`` and the transform torch -> NNX.

    ``conv1d`` names the modules stored as ``transformers``' ``Conv1D`` (a model class's
    ``CONV1D``), whose ``(d_in, d_out)`` weight is an ``nnx.Linear`` kernel as it is."""
    dotted = ".".join(str(p) for p in path)
    if len(path) > 1 and path[-1] == "kernel" and str(path[-2]) in conv1d:
        return dotted.removesuffix("kernel") + "weight", lambda w: w
    for pattern, repl, transform in RULES:
        if pattern.fullmatch(dotted):
            return pattern.sub(repl, dotted), transform
    raise ValueError(f"No Hugging Face name rule for parameter {dotted!r}.")


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for a single-file or sharded checkpoint."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.exists():
        other = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = (f" Found {other}: convert them with `model.save_pretrained(dir, safe_serialization=True)`."
                if other else "")
        raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {directory}.{hint}")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(file: Path):
    """A lazy reader of one safetensors file (its header is checked: a truncated file fails here)."""
    if not file.exists():
        raise FileNotFoundError(f"Checkpoint shard {file} listed in the index is missing; "
                                "re-download or re-save the model.")
    try:
        return safe_open(str(file), framework="flax")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"Cannot read {file} as safetensors ({e}); the file is corrupt or truncated: "
                         "re-download it or write it again with save_pretrained.") from e


def read_safetensors(file: Path) -> dict[str, jax.Array]:
    """Every tensor of one safetensors file; a corrupt or truncated file is a ``ValueError`` that
    says so."""
    handle = open_safetensors(file)
    try:
        return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"Cannot read {file} ({e}); the file is corrupt or truncated: re-download "
                         "it or write it again with save_pretrained.") from e


class WeightFiles:
    """Lazy reader over the safetensors files of a directory."""

    def __init__(self, directory: Path):
        self.location = _weight_files(directory)
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def __getitem__(self, name: str) -> jax.Array:
        file = self.location[name]
        if file not in self._handles:
            self._handles[file] = open_safetensors(file)
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"Cannot read tensor {name!r} from {file} ({e}); the file is corrupt: "
                             "re-download it or re-save the model with save_pretrained.") from e
