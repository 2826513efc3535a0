"""``fedlora-jax solve``: the (q, rho) allocation of a system profile, against the baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import solver, wireless
from fedlora_jax.fields import require
from fedlora_jax.metrics import plot_allocation

EPILOG = """example:
  fedlora-jax solve --clients 100 --seed 0 --rank 8 --bandwidth-mhz 10 --out runs/solve
  fedlora-jax solve --profile traces.csv --alpha 50 --beta 100

A trace (CSV/JSON) has flops_per_s and either power_w + gain or rate_bps / rate_kbps per client.
Writes allocation.json (q, rho, k per client, objective, expected round time, predicted rounds,
the same for the uniform / fixed-ratio / full baselines) and allocation.png.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "solve", help="optimal sampling probabilities and sketch ratios for a wireless system",
        description="Minimize (alpha V(q, rho) + beta) * E[T](q, rho) over sampling probabilities q and "
                    "LoRA sketch ratios rho = k/r for a generated or measured system profile.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100, help="clients to generate (or the trace's count)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the generated profile and restarts")
    p.add_argument("--profile", type=Path, help="measured trace (.csv or .json) instead of a generated one")
    p.add_argument("--rank", type=int, default=8, help="global LoRA rank r")
    p.add_argument("--bandwidth-mhz", type=float, default=10.0, help="system bandwidth Bw in MHz")
    p.add_argument("--q-min", type=float, default=0.05, help="smallest sampling probability")
    p.add_argument("--alpha", type=float, default=None, help="bound coefficient alpha (default: clients)")
    p.add_argument("--beta", type=float, default=100.0, help="bound constant beta")
    p.add_argument("--base-params", type=float, default=125e6, help="frozen base parameters")
    p.add_argument("--lora-params", type=float, default=0.3e6, help="LoRA parameters at rank r")
    p.add_argument("--tokens-per-step", type=float, default=4096, help="tokens per local step")
    p.add_argument("--local-steps", type=int, default=5, help="local steps H per round")
    p.add_argument("--surrogate", choices=solver.SURROGATES, default="normal", help="E[T] surrogate")
    p.add_argument("--round-overhead-s", type=float, default=None,
                   help="seconds every round costs, empty ones too (default: the broadcast of the "
                        "full-rank adapter at the system's downlink rate)")
    p.add_argument("--min-round-s", type=float, default=0.0, help="shortest possible round (s)")
    p.add_argument("--out", type=Path, default=Path("runs/solve"), help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Every input is checked before any compilation.
    require(args.bandwidth_mhz > 0, "--bandwidth-mhz", args.bandwidth_mhz, "be > 0 MHz", "e.g. 10")
    sys_cfg = wireless.SystemConfig(bandwidth_hz=args.bandwidth_mhz * 1e6)
    cfg = solver.SolverConfig(q_min=args.q_min, rank=args.rank, surrogate=args.surrogate, seed=args.seed)
    for name, value in (("--base-params", args.base_params), ("--lora-params", args.lora_params),
                        ("--tokens-per-step", args.tokens_per_step)):
        require(value > 0, name, value, "be a count > 0")
    require(args.local_steps >= 1, "--local-steps", args.local_steps, "be at least 1")
    workload = wireless.workload_from_counts(args.base_params, args.lora_params, args.tokens_per_step,
                                             args.local_steps)
    overhead = (workload.payload_bits_full_rank / sys_cfg.downlink_bps if args.round_overhead_s is None
                else args.round_overhead_s)
    if args.profile is not None:
        profile = wireless.load_trace(args.profile)
    else:
        require(args.clients >= 1, "--clients", args.clients, "be at least 1")
        profile = wireless.generate_profile(jax.random.key(args.seed), args.clients, sys_cfg)
    n = profile.num_clients
    alpha = float(n) if args.alpha is None else args.alpha
    problem = solver.make_problem(profile, sys_cfg, workload, jnp.ones(n), jnp.full(n, 1.0 / n), alpha, args.beta,
                                  overhead_s=overhead, min_round_s=args.min_round_s)
    result = solver.solve_problem(problem, jax.random.key(args.seed), cfg)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {name: {k: float(v) for k, v in terms.items()} for name, terms in result.baselines.items()}
    summary["adaptive"] = {k: float(getattr(result, k))
                           for k in ("objective", "expected_round_time", "predicted_rounds")}
    record = {"clients": n, "rank": args.rank, "bandwidth_hz": sys_cfg.bandwidth_hz, "alpha": alpha,
              "round_overhead_s": overhead, "min_round_s": args.min_round_s,
              "beta": args.beta, "surrogate": args.surrogate, "summary": summary,
              "q": np.asarray(result.q).tolist(), "rho": np.asarray(result.rho).tolist(),
              "k": np.asarray(result.k).tolist()}
    (args.out / "allocation.json").write_text(json.dumps(record, indent=1))
    snr = profile.power_w * profile.gain / sys_cfg.noise_w_per_hz
    plot_allocation({"q": record["q"], "rho": record["rho"],
                     "flops_per_s": np.asarray(profile.flops_per_s).tolist(),
                     "snr_hz": np.asarray(snr).tolist()},
                    args.out / "allocation.png", title="adaptive allocation per client")

    print(f"{'strategy':<12} {'E[T] (s)':>10} {'rounds':>10} {'total (s)':>12}")
    for name, s in summary.items():
        print(f"{name:<12} {s['expected_round_time']:>10.3f} {s['predicted_rounds']:>10.1f} {s['objective']:>12.1f}")
    print(f"wrote {args.out / 'allocation.json'} and {args.out / 'allocation.png'}")
    return 0
