"""Client-steps/s and MFU of the local step on an accelerator, against PyTorch + PEFT on the same
device: MiniLM-L6 and a 1B LLaMA-family decoder (the Llama-3.2-1B config with random weights,
saved by ``transformers`` and loaded by both sides), in bf16.

Both sides train in pure bf16: the frozen weights, the LoRA factors (r=16 on the query and value
projections) and the AdamW state (torch: the model cast to bf16, PEFT's adapters with it).
fedlora_jax runs one round of C clients x H local steps as one compiled chunk on one device;
torch trains the clients one after another. ``mfu`` is XLA's FLOP count of the local step times
C x H over the round time, divided by ``--peak-tflops`` (the device's dense bf16 peak from its
data sheet); ``of_matmul_peak`` divides by a bf16 matmul measured in the same run.

    python benchmarks/accelerator.py --peak-tflops 989 --json accelerator.json    # H200 SXM
    python benchmarks/accelerator.py --models llama-tiny --quick                 # check on a CPU
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import torch
import transformers

from fedlora_jax.data.builtin import minilm_path
from fedlora_jax.tasks import causal_lm_loss, classification_loss
from common import (fmt_spread, interleaved_times, load_average, parser, spread,  # benchmarks/
                    write_rows)
from vs_pytorch import TorchFederation, client_batches, jax_engine, jax_model, step_gflop

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                tie_word_embeddings=True, max_position_embeddings=4096)  # Llama-3.2-1B's shapes
LLAMA_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)
# name -> (causal, (batch, sequence length)); the LLaMA checkpoints are written by model_dir
MODELS = {"minilm-l6": (False, (8, 128)), "llama-1b": (True, (4, 512)),
          "llama-tiny": (True, (2, 64))}


def model_dir(name: str, tmp: str) -> str:
    """MiniLM-L6's checkpoint, or a random-weight LLaMA of the named shape saved in bf16."""
    if name == "minilm-l6":
        return str(minilm_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(LLAMA_1B if name == "llama-1b" else LLAMA_TINY))
    path = os.path.join(tmp, name)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def matmul_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Best bf16 ``n x n`` matmul rate of XLA on this device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / interleaved_times({"mm": lambda: mm(a)}, repeats)["mm"].min() / 1e12


def measure(name: str, path: str, clients: int, steps: int, repeats: int, peak: float,
            matmul_peak: float) -> dict:
    causal, (batch, seq) = MODELS[name]
    loss_fn = causal_lm_loss if causal else classification_loss
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = TorchFederation(path, causal=causal, device=device, dtype=torch.bfloat16)
    batches = client_batches(reference.model.config.vocab_size, clients, steps, batch=batch,
                             seq=seq)
    model = jax_model(path, causal=causal, dtype=jnp.bfloat16)
    gflop = step_gflop(model, {k: v[0, 0] for k, v in batches.items()}, loss_fn)
    engine = jax_engine(model, batches, steps, None, loss_fn)
    state = [engine.init()]

    def jax_round():
        state[0], _ = engine.run_round(state[0])
        return state[0].trainable

    def torch_round():
        reference.round(batches)
        if device == "cuda":
            torch.cuda.synchronize()

    load = load_average()
    times = {k: spread(t) for k, t in interleaved_times({"torch": torch_round, "jax": jax_round},
                                                        repeats).items()}
    work = clients * steps
    achieved = {k: gflop * work / t["min"] / 1e3 for k, t in times.items()}  # TFLOP/s
    return {"model": name, "device": jax.devices()[0].device_kind, "torch_device": device,
            "clients": clients, "local_steps": steps, "batch": batch, "seq_len": seq,
            "dtype": "bfloat16", "repeats": repeats, "seconds": times, "step_gflop": gflop,
            "jax_client_steps_per_s": work / times["jax"]["min"],
            "torch_client_steps_per_s": work / times["torch"]["min"],
            "speedup": times["torch"]["min"] / times["jax"]["min"],
            "jax_tflops": achieved["jax"], "torch_tflops": achieved["torch"],
            "jax_mfu": achieved["jax"] / peak if peak else None,
            "torch_mfu": achieved["torch"] / peak if peak else None,
            "jax_of_matmul_peak": achieved["jax"] / matmul_peak,
            "load_average": [load, load_average()]}


def main(argv=None) -> list[dict]:
    p = parser(__doc__, "C=4 clients x H=2 steps, 3 repeats (else C=8 x H=4, 5 repeats)")
    p.add_argument("--models", nargs="+", default=["minilm-l6", "llama-1b"], choices=list(MODELS))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (data sheet), for the MFU")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and "llama-1b" in args.models:
        p.error("llama-1b needs an accelerator and JAX sees only the CPU; check the script on a "
                "CPU with --models llama-tiny --quick")
    clients, steps, repeats = (4, 2, 3) if args.quick else (8, 4, 5)
    matmul_peak = matmul_peak_tflops(2048 if jax.default_backend() == "cpu" else 8192)
    print(f"{jax.devices()[0].device_kind}: bf16 matmul {matmul_peak:.3g} TFLOP/s measured, "
          f"{args.peak_tflops or 'no'} TFLOP/s data-sheet peak; C={clients} clients x "
          f"H={steps} steps, best of {repeats} interleaved repeats (round ms min/median/max)")
    print(f"{'model':<11} {'jax st/s':>9} {'torch st/s':>10} {'speedup':>8} {'jax TFLOP/s':>11} "
          f"{'MFU':>6} {'torch MFU':>9} {'jax ms':>20} {'torch ms':>20}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = measure(name, model_dir(name, tmp), clients, steps, repeats, args.peak_tflops,
                          matmul_peak)
            rows.append(row)
            mfu = lambda x: f"{x:.1%}" if x is not None else "-"
            print(f"{name:<11} {row['jax_client_steps_per_s']:>9.2f} "
                  f"{row['torch_client_steps_per_s']:>10.2f} {row['speedup']:>7.2f}x "
                  f"{row['jax_tflops']:>11.1f} {mfu(row['jax_mfu']):>6} "
                  f"{mfu(row['torch_mfu']):>9} {fmt_spread(row['seconds']['jax']):>20} "
                  f"{fmt_spread(row['seconds']['torch']):>20}", flush=True)
    return write_rows(rows, args.json, torch=torch.__version__,
                      bf16_matmul_tflops=matmul_peak, peak_tflops=args.peak_tflops)


if __name__ == "__main__":
    main()
