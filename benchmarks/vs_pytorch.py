"""The same federated work in PyTorch + PEFT (a sequential loop over clients) and in fedlora_jax.

Per round, C clients each load the global adapter, take H AdamW steps on batches of 8 x 64 tokens
with LoRA r=16 on query/value (+ the classifier head) and return their update, as FSLoRA and
OpenFedLLM do it in PyTorch; fedlora_jax runs the same round as one compiled, vmapped chunk
(optionally a compiled loop over vmapped blocks, ``block_size``). Both sides run the same model:
the MiniLM-L6 checkpoint, and a tiny 2-layer d=64 BERT saved once by ``transformers`` and loaded by
both. torch runs with one thread per core and with one thread, and keeps the faster.
``peak_gflops`` is the best matmul rate measured in this process (JAX or torch) in the row's
precision: ``fp32``, or ``bf16`` (JAX: ``model.compute_dtype=bfloat16``, bf16 matmuls with fp32
master weights; torch: ``torch.autocast("cpu", torch.bfloat16)`` around the forward);
``achieved_gflops`` counts XLA's FLOPs of one local step (forward + backward) times C x H over
the measured round time. Every side is timed over the same interleaved repeats (at least 3); the
figures are the best, printed with the min/median/max round times and the load average.
Ratios are measured in one process on one machine.

    python benchmarks/vs_pytorch.py --quick --json vs_pytorch.json
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from fedlora_jax.client import ClientConfig, split_model
from fedlora_jax.data.builtin import minilm_path
from fedlora_jax.data.pool import ClientPool
from fedlora_jax.engine import FederatedEngine, FederationConfig
from fedlora_jax.lora import TRAINABLE, LoRAConfig, apply_lora, set_compute_dtype
from fedlora_jax.models.hf import load_pretrained
from fedlora_jax.optim import OptimizerConfig
from fedlora_jax.tasks import classification_loss
from common import (best_time, fmt_spread, interleaved_times, jax_matmul_gflops,  # benchmarks/
                    load_average, parser, spread, write_rows)

RANK, BATCH, SEQ, LABELS, LR = 16, 8, 64, 4, 1e-4
TINY = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=SEQ, num_labels=LABELS)


def model_dirs(tmp: str) -> dict[str, str]:
    """The two checkpoints both frameworks load: MiniLM-L6 and a tiny BERT saved here."""
    torch.manual_seed(0)
    tiny = os.path.join(tmp, "tiny-bert-d64")
    transformers.BertForSequenceClassification(TINY).save_pretrained(tiny)
    return {"minilm-l6": str(minilm_path()), "tiny-d64": tiny}


def client_batches(vocab: int, clients: int, steps: int, seed: int = 0, batch: int = BATCH,
                   seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (clients, steps, batch, seq)
    return {"input_ids": rng.integers(1000 if vocab > 2000 else 1, vocab, shape).astype(np.int32),
            "attention_mask": np.ones(shape, np.int32),
            "labels": rng.integers(0, LABELS, shape[:3]).astype(np.int32)}


PRECISIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", torch.bfloat16)}  # jax, autocast


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, precision: str = "fp32"
                       ) -> dict[str, float]:
    """Best n x n matmul rate of JAX (XLA:CPU) and of torch on this machine in ``precision``."""
    jax_dtype, _ = PRECISIONS[precision]
    b = torch.randn(n, n, dtype=getattr(torch, jax_dtype))
    return {"jax": jax_matmul_gflops(n, repeats, jax_dtype),
            "torch": 2 * n**3 / best_time(lambda: b @ b, repeats) / 1e9}


class TorchFederation:
    """The PyTorch + PEFT reference: clients trained one after another from the global adapter.
    ``causal``: a decoder trained on next-token prediction (LoRA on q_proj/v_proj), else a
    BERT classifier (LoRA on query/value + the head); ``device`` and ``dtype`` of the model;
    ``autocast``: the forward's autocast dtype (mixed precision; ``None``: off)."""

    def __init__(self, path: str, *, causal: bool = False, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None):
        import peft

        if causal:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=2 * RANK,
                                  lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        else:
            model = transformers.BertForSequenceClassification.from_pretrained(
                path, num_labels=LABELS, local_files_only=True)
            cfg = peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=2 * RANK,
                                  lora_dropout=0.0, target_modules=["query", "value"])
        self.peft, self.causal, self.device, self.autocast = peft, causal, device, autocast
        self.model = peft.get_peft_model(model.to(device=device, dtype=dtype), cfg).train()
        self.global_state = {k: v.clone() for k, v in
                             peft.get_peft_model_state_dict(self.model).items()}

    def round(self, batches: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        data = {k: torch.from_numpy(v.astype(np.int64)).to(self.device)
                for k, v in batches.items()}
        if self.causal:  # next-token prediction (transformers shifts the labels)
            data["labels"] = data["input_ids"]
        total = {k: torch.zeros_like(v) for k, v in self.global_state.items()}
        for c in range(data["labels"].shape[0]):
            self.peft.set_peft_model_state_dict(self.model, self.global_state)
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
            for h in range(data["labels"].shape[1]):
                with torch.autocast(torch.device(self.device).type, dtype=self.autocast,
                                    enabled=self.autocast is not None):
                    out = self.model(input_ids=data["input_ids"][c, h],
                                     attention_mask=data["attention_mask"][c, h],
                                     labels=data["labels"][c, h])
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            trained = self.peft.get_peft_model_state_dict(self.model)
            for k in total:
                total[k] += trained[k].detach() - self.global_state[k]
        return total


def jax_model(path: str, causal: bool = False, dtype=jnp.float32, compute_dtype=None):
    """The same model in fedlora_jax, with the same adapters as :class:`TorchFederation`
    (``compute_dtype``: its matmuls' dtype, :func:`fedlora_jax.lora.set_compute_dtype`)."""
    if causal:
        model, _, _ = load_pretrained(path, task="causal_lm", dtype=dtype)
        lora = LoRAConfig(rank=RANK, alpha=2.0 * RANK, targets=("q_proj", "v_proj"),
                          modules_to_save=())
    else:
        model, _, _ = load_pretrained(path, task="classification", num_labels=LABELS, dtype=dtype)
        lora = LoRAConfig(rank=RANK, alpha=2.0 * RANK, targets=("query", "value"),
                          modules_to_save=("classifier",))
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    if compute_dtype is not None:
        set_compute_dtype(model, compute_dtype)
    return model


def step_gflop(model, batch: dict[str, np.ndarray], loss_fn=classification_loss) -> float:
    """XLA's FLOP count of one local step's forward and backward pass (one client, one batch)."""
    graphdef, trainable, rest = nnx.split(model, TRAINABLE, ...)
    grad = jax.jit(jax.grad(lambda t, b: loss_fn(nnx.merge(graphdef, t, rest), b)[0]))
    cost = grad.lower(trainable, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 1e9


def jax_engine(model, batches: dict[str, np.ndarray], steps: int, block_size: int | None,
               loss_fn=classification_loss) -> FederatedEngine:
    clients, _, batch = batches["input_ids"].shape[:3]
    flat = {k: v.reshape(clients * steps * batch, *v.shape[3:]) for k, v in batches.items()}
    pool = ClientPool.from_partition(flat, np.split(np.arange(clients * steps * batch), clients))
    return FederatedEngine(split_model(model), pool, loss_fn,
                           client=ClientConfig(steps, batch),
                           client_optimizer=OptimizerConfig("adamw", LR),
                           federation=FederationConfig(sampling="full", chunk_size=clients,
                                                       block_size=block_size, devices=1))


def torch_rounds(reference: TorchFederation, batches: dict[str, np.ndarray]) -> dict:
    """torch's round with one thread per core and with one thread (on a shared, loaded machine
    torch's OpenMP threads can stall each other; torch is credited with the faster)."""
    def at(threads):
        def run():
            torch.set_num_threads(threads)
            return reference.round(batches)
        return run
    return {f"torch@{t}": at(t) for t in sorted({os.cpu_count() or 1, 1}, reverse=True)}


def measure(name: str, path: str, clients: int, steps: int, blocks: list[int | None],
            repeats: int, peak: float, precision: str = "fp32") -> list[dict]:
    """Both sides' round times in ``precision``, interleaved over ``repeats`` rounds; speedups
    from the best."""
    jax_dtype, autocast = PRECISIONS[precision]
    reference = TorchFederation(path, autocast=autocast)
    vocab = reference.model.config.vocab_size
    batches = client_batches(vocab, clients, steps)
    model = jax_model(path, compute_dtype=None if autocast is None else jax_dtype)
    gflop = step_gflop(model, {k: v[0, 0] for k, v in batches.items()})
    engines = {b: jax_engine(model, batches, steps, b) for b in blocks}
    states = {b: eng.init() for b, eng in engines.items()}

    def jax_round(b):
        states[b], _ = engines[b].run_round(states[b])
        return states[b].trainable

    load = load_average()
    times = interleaved_times({**torch_rounds(reference, batches),
                               **{f"jax@{b}": functools.partial(jax_round, b) for b in blocks}},
                              repeats)
    torch.set_num_threads(os.cpu_count() or 1)
    torch_key = min((k for k in times if k.startswith("torch")), key=lambda k: times[k].min())
    t_torch = spread(times[torch_key])
    work = clients * steps
    rows = []
    for b in blocks:
        t = spread(times[f"jax@{b}"])
        rows.append({"model": name, "precision": precision, "clients": clients, "local_steps": steps, "batch": BATCH,
                     "seq_len": SEQ, "rank": RANK, "block_size": b or clients, "repeats": repeats,
                     "torch_round_s": t_torch, "jax_round_s": t,
                     "torch_client_steps_per_s": work / t_torch["min"],
                     "jax_client_steps_per_s": work / t["min"], "speedup": t_torch["min"] / t["min"],
                     "speedup_of_medians": t_torch["median"] / t["median"],
                     "step_gflop": gflop, "achieved_gflops": gflop * work / t["min"],
                     "torch_achieved_gflops": gflop * work / t_torch["min"],
                     "torch_threads": int(torch_key.split("@")[1]), "peak_gflops": peak,
                     "fraction_of_peak": gflop * work / t["min"] / peak,
                     "load_average": [load, load_average()]})
    return rows


def main(argv=None) -> list[dict]:
    args = parser(__doc__, "one setting per model").parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    # model -> (client counts, local steps, block sizes of the fp32 rows); bf16 rows: one block
    if args.quick:
        grid = {"minilm-l6": ([4], 2, [None, 1]), "tiny-d64": ([16], 4, [None, 8])}
        repeats = 3
    else:
        grid = {"minilm-l6": ([8, 32], 4, [None, 1, 4]), "tiny-d64": ([32, 128], 8, [None, 8, 32])}
        repeats = 5
    peaks = {p: matmul_peak_gflops(precision=p) for p in PRECISIONS}
    for p, peak in peaks.items():
        print(f"{p} matmul peak: jax {peak['jax']:.1f} GFLOP/s, torch {peak['torch']:.1f} "
              f"GFLOP/s ({cores} threads)")
    print(f"best of {repeats} interleaved repeats per side; round times min/median/max in ms; "
          "load = 1-min load average before/after")
    print(f"{'model':<10} {'prec':>4} {'C':>4} {'H':>2} {'block':>5} {'torch st/s':>10} {'thr':>3} "
          f"{'jax st/s':>9} {'speedup':>8} {'(median)':>8} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'torch ms':>17} {'jax ms':>17} {'load':>11}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_dirs(tmp).items():
            clients_list, steps, blocks = grid[name]
            settings = [(c, blocks, "fp32") for c in clients_list] + [
                (c, blocks[:1], "bf16") for c in clients_list]
            for clients, blocks_of, precision in settings:
                for row in measure(name, path, clients, steps, blocks_of, repeats,
                                   max(peaks[precision].values()), precision):
                    rows.append(row)
                    print(f"{name:<10} {precision:>4} {clients:>4} {steps:>2} {row['block_size']:>5} "
                          f"{row['torch_client_steps_per_s']:>10.2f} {row['torch_threads']:>3} "
                          f"{row['jax_client_steps_per_s']:>9.2f} {row['speedup']:>7.2f}x "
                          f"{row['speedup_of_medians']:>7.2f}x "
                          f"{row['achieved_gflops']:>8.1f} {row['fraction_of_peak']:>8.0%} "
                          f"{fmt_spread(row['torch_round_s']):>17} "
                          f"{fmt_spread(row['jax_round_s']):>17} "
                          f"{'%.1f/%.1f' % tuple(row['load_average']):>11}", flush=True)
    return write_rows(rows, args.json, torch=torch.__version__,
                      **{f"{side}_{p}_matmul_gflops": peak[side]
                         for p, peak in peaks.items() for side in ("jax", "torch")})


if __name__ == "__main__":
    main()
