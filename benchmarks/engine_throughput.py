"""Client-steps per second of the vmapped engine against a sequential per-client loop.

Both run the same clients (same model, sketches, batches and local steps) through the same
jitted code: the loop calls the single-client update once per client, the engine calls the
vmapped chunk once (and, as a variant, a compiled loop over vmapped blocks of 8 clients). The
three are timed over the same interleaved repeats (at least 3); the figures are the best, printed
with the min/median/max chunk times and the load average. Ratios are measured in one process on
one machine.

    python benchmarks/engine_throughput.py --quick --json engine.json
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedlora_jax.client import client_update, split_model, train_clients
from fedlora_jax.data.pool import ClientPool, sample_batches
from fedlora_jax.lora import LoRAConfig, apply_lora
from fedlora_jax.models.tiny import TinyConfig, TinyTransformer
from fedlora_jax.optim import OptimizerConfig, make_optimizer
from fedlora_jax.sketch import draw_sketch
from fedlora_jax.tasks import classification_loss
from common import (fmt_spread, interleaved_times, jax_matmul_gflops, load_average,  # benchmarks/
                    parser, spread, write_rows)

BLOCK = 8  # clients per vmapped block in the blocked variant (jax.lax.map over blocks)

MODELS = {
    "tiny-d64": TinyConfig(vocab_size=1000, d_model=64, num_layers=2, num_heads=4, d_ff=256,
                           max_len=64),
    "small-d128": TinyConfig(vocab_size=1000, d_model=128, num_layers=4, num_heads=4, d_ff=512,
                             max_len=64),
    "base-d384": TinyConfig(vocab_size=1000, d_model=384, num_layers=6, num_heads=12, d_ff=1536,
                            max_len=64),
}


def measure(name: str, cfg: TinyConfig, chunk: int, steps: int, batch: int, seq: int,
            repeats: int) -> dict:
    model = TinyTransformer(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0), rngs=nnx.Rngs(1))
    parts = split_model(model)
    rng = np.random.default_rng(0)
    m = chunk * 16
    pool = ClientPool.from_partition(
        {"input_ids": rng.integers(0, cfg.vocab_size, (m, seq)).astype(np.int32),
         "attention_mask": np.ones((m, seq), np.int32),
         "labels": rng.integers(0, cfg.num_labels, m).astype(np.int32)},
        np.split(np.arange(m), chunk))
    keys = jax.random.split(jax.random.key(0), (chunk, 2))
    ks = jnp.asarray(rng.integers(1, 17, chunk))
    sketches = jax.vmap(lambda k, kn: draw_sketch(k, kn, parts.sketch, shared_across_layers=True)
                        )(keys[:, 0], ks)
    batches = jax.vmap(lambda i, k: sample_batches(pool, i, k, steps, batch))(
        jnp.arange(chunk), keys[:, 1])
    opt = make_optimizer(OptimizerConfig("adamw", 1e-3))
    kw = dict(loss_fn=classification_loss, optimizer=opt)
    vmapped = jax.jit(lambda s, b: train_clients(parts.graphdef, parts.base, parts.trainable, s, b,
                                                 **kw)[0])
    blocked = jax.jit(lambda s, b: train_clients(parts.graphdef, parts.base, parts.trainable, s, b,
                                                 block_size=BLOCK, **kw)[0])
    single = jax.jit(lambda s, b: client_update(parts.graphdef, parts.base, parts.trainable, s, b,
                                                **kw)[0])
    per_client = [(jax.tree.map(lambda x: x[c], sketches), jax.tree.map(lambda x: x[c], batches))
                  for c in range(chunk)]
    flops = vmapped.lower(sketches, batches).compile().cost_analysis()["flops"]
    load = load_average()
    times = {name: spread(t) for name, t in interleaved_times(
        {"loop": lambda: [single(s, b) for s, b in per_client],
         "vmapped": lambda: vmapped(sketches, batches),
         "blocked": lambda: blocked(sketches, batches)}, repeats).items()}
    t_loop, t_vmap, t_block = (times[k]["min"] for k in ("loop", "vmapped", "blocked"))
    client_steps = chunk * steps
    return {"model": name, "d_model": cfg.d_model, "chunk": chunk, "local_steps": steps,
            "batch": batch, "seq_len": seq, "repeats": repeats,
            "sequential_client_steps_per_s": client_steps / t_loop,
            "vmapped_client_steps_per_s": client_steps / t_vmap,
            "vmapped_tokens_per_s": client_steps * batch * seq / t_vmap,
            "speedup": t_loop / t_vmap,
            "speedup_of_medians": times["loop"]["median"] / times["vmapped"]["median"],
            "vmapped_gflops": flops / t_vmap / 1e9, "sequential_gflops": flops / t_loop / 1e9,
            f"blocked{BLOCK}_client_steps_per_s": client_steps / t_block,
            "blocked_speedup": t_loop / t_block, "seconds": times,
            "load_average": [load, load_average()]}


def main(argv=None) -> list[dict]:
    args = parser(__doc__, "small grid, about a minute").parse_args(argv)
    # (model, local steps, batch, sequence length) -> chunk sizes; the first work size is the
    # light per-client load of large client-count sweeps, the second a typical fine-tuning step.
    if args.quick:
        grid = {("tiny-d64", 2, 2, 16): [1, 8, 32, 64], ("tiny-d64", 2, 4, 32): [8, 32],
                ("base-d384", 2, 4, 32): [1, 8]}
        repeats = 3
    else:
        grid = {("tiny-d64", 4, 2, 16): [1, 4, 16, 32, 64, 128, 256],
                ("tiny-d64", 4, 8, 64): [1, 8, 32, 64],
                ("small-d128", 4, 2, 16): [1, 8, 32, 64, 128],
                ("small-d128", 4, 8, 64): [1, 8, 32, 64], ("base-d384", 4, 8, 64): [1, 4, 8, 16]}
        repeats = 5
    peak = jax_matmul_gflops(1024)
    print(f"fp32 matmul peak of this machine: {peak:.1f} GFLOP/s")
    rows = []
    print(f"best of {repeats} interleaved repeats per side; chunk times min/median/max in ms; "
          "load = 1-min load average before/after")
    print(f"{'model':<11} {'work':>8} {'chunk':>5} {'loop steps/s':>13} {'vmap steps/s':>13} "
          f"{'vmap GFLOP/s':>12} {'speedup':>8} {'(median)':>8} {'blocked x':>10} "
          f"{'loop ms':>17} {'vmap ms':>17} {'blocked ms':>17} {'load':>11}")
    for (name, steps, batch, seq), chunks in grid.items():
        for chunk in chunks:
            row = measure(name, MODELS[name], chunk, steps, batch, seq, repeats)
            row["peak_gflops"] = peak
            rows.append(row)
            t = row["seconds"]
            print(f"{name:<11} {f'{batch}x{seq}':>8} {chunk:>5} "
                  f"{row['sequential_client_steps_per_s']:>13.1f} "
                  f"{row['vmapped_client_steps_per_s']:>13.1f} {row['vmapped_gflops']:>12.1f} "
                  f"{row['speedup']:>7.2f}x {row['speedup_of_medians']:>7.2f}x "
                  f"{row['blocked_speedup']:>9.2f}x {fmt_spread(t['loop']):>17} "
                  f"{fmt_spread(t['vmapped']):>17} {fmt_spread(t['blocked']):>17} "
                  f"{'%.1f/%.1f' % tuple(row['load_average']):>11}", flush=True)
    return write_rows(rows, args.json)


if __name__ == "__main__":
    main()
