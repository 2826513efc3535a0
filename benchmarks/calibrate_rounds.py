"""Calibrates the rounds model of ``adaptive`` against training: the defaults of ``adaptive_calibrated``.

    python benchmarks/calibrate_rounds.py --out docs/results/calibrate_rounds

``adaptive`` plans with ``R(q, rho) = (alpha V_law / s^2 + beta) / s^p`` (:func:`theory.predicted_rounds`,
``alpha = 1 / |g|^2``, ``beta = 1``, ``p`` the update law's ``progress_power``), which is assumed,
not measured. Here the tiny preset's task (the protocol of docs/results.md, section 1: AdamW
clients, 100 examples a client, 30% held out) trains with ``fixed`` at uniform ``q`` and one common
``rho`` over a grid of ``(q, rho)``, on **tuning seeds only**, scored on the **validation split**;
the rounds each run needs to reach a validation accuracy target are fitted by

    log R_meas = log R_0 + log((c alpha V_law / s^2 + 1) / s^p)

with ``alpha V_law / s^2`` at each seed's estimates (``est_g2_mean`` and ``est_signal`` logged at
round ``--estimate-round`` of its run at the pilot's setting, ``q = K/N``, full rank: what
``adaptive`` sees when it first plans). The fit gives the noise weight ``c`` (``alpha = c /
|g|^2``; the paper's model: 1) and the progress power ``p`` (the AdamW law: 0.5), the options
``noise_scale`` and ``progress_power`` of ``adaptive_calibrated`` (``R_0``, the rounds at no noise
and full step, does not change the solver's argmin). A run that misses the target within
``--rounds`` is censored: it only says the model should predict more rounds than that. Finished runs in ``--runs`` are reused. Writes ``OUT/calibration.json``
(settings, every run's rounds to target, the fit, and the fit's residuals against the assumed
constants) and ``OUT/runs.jsonl.gz`` (every round of every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
from scipy import optimize

from fedlora_jax import theory
from fedlora_jax.commands import compare
from fedlora_jax.config import load_config

# the tiny protocol of docs/results.md, section 1 (validation split: the tuning stage's)
TINY = ["data.synthetic_per_client=100", "data.heldout_fraction=0.3", "checkpoint_every=0",
        "eval_every=1", "data.validation_fraction=0.5", "data.evaluate_on=validation",
        "strategy=fixed"]


def run_grid(args) -> dict[tuple, list[dict]]:
    """Trains (or reuses) ``fixed`` at every ``(participants, sketch_ratio, seed)``."""
    cfgs = {}
    for k in args.participants:
        for rho in args.ratios:
            for seed in args.seeds:
                folder = Path(args.runs) / f"K{k:g}_rho{rho:g}" / f"seed{seed}"
                cfgs[(k, rho, seed)] = load_config(None, [
                    *TINY, f"federation.rounds={args.rounds}", f"federation.participants={k}",
                    f"federation.sketch_ratio={rho}", f"federation.seed={seed}",
                    f"client_optimizer.name={args.optimizer}",
                    f"client_optimizer.learning_rate={args.lr}", f"output_dir={folder}"],
                    preset="tiny")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    return compare.run_configs(cfgs, Path(args.runs) / "runs.jsonl"), cfgs


def rounds_to(rows: list[dict], target: float) -> float:
    """First round whose validation accuracy is at or above ``target`` (``inf``: never)."""
    rounds, acc = compare.curve(rows, "round")
    hit = np.flatnonzero(acc >= target)
    return float(rounds[hit[0]]) if hit.size else np.inf


def noise_and_shrink(q: float, rho: float, ratio: float, n: int, law: theory.UpdateLaw):
    """``alpha V_law / s^2`` and ``s`` at uniform ``q``, common ``rho``, equal data weights and
    ``G_n^2 / |g|^2 = ratio`` for every client (the model's terms, from :mod:`fedlora_jax.theory`)."""
    q_, rho_, a = np.full(n, q), np.full(n, rho), np.full(n, 1.0 / n)
    s = float(theory.step_shrink(rho_, a, law))
    noise = float(theory.aggregate_variance(q_, rho_, np.full(n, ratio), a, law)) / s ** 2
    return noise, s


def model(params: np.ndarray, noise: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``log R`` at ``params = (log R_0, log c, p)``."""
    log_r0, log_c, p = params
    return log_r0 + np.log(np.exp(log_c) * noise + 1.0) - p * np.log(s)


def fit(log_rounds: np.ndarray, noise: np.ndarray, s: np.ndarray, fixed: dict | None = None,
        censored: np.ndarray | None = None) -> dict:
    """Least squares in ``log R``; ``fixed`` pins ``c`` and/or ``p`` (then only the rest is fitted).
    A ``censored`` run (missed the target) gives a lower bound ``log_rounds``: no residual where the
    model predicts at least that many rounds, the shortfall where it predicts fewer."""
    fixed = fixed or {}
    censored = np.zeros(len(log_rounds), bool) if censored is None else censored
    names = ("log_r0", "log_c", "p")
    pinned = {"log_c": np.log(fixed["c"])} if "c" in fixed else {}
    pinned |= {"p": fixed["p"]} if "p" in fixed else {}
    free = [k for k in names if k not in pinned]
    start = {"log_r0": float(np.mean(log_rounds[~censored])), "log_c": 0.0, "p": 0.5}
    lo = {"log_r0": -np.inf, "log_c": np.log(1e-4), "p": -2.0}
    hi = {"log_r0": np.inf, "log_c": np.log(1e4), "p": 3.0}

    def full(x):
        values = dict(zip(free, x)) | pinned
        return np.array([values[k] for k in names])

    def residual(x):
        r = model(full(x), noise, s) - log_rounds
        return np.where(censored, np.minimum(r, 0.0), r)

    res = optimize.least_squares(residual,
                                 [start[k] for k in free], bounds=([lo[k] for k in free], [hi[k] for k in free]))
    log_r0, log_c, p = full(res.x)
    resid = res.fun
    return {"r0": float(np.exp(log_r0)), "c": float(np.exp(log_c)), "p": float(p),
            "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))), "fitted": free}


def params(fitted: dict) -> np.ndarray:
    return np.array([np.log(fitted["r0"]), np.log(fitted["c"]), fitted["p"]])


def library_rounds(fitted: dict, q: float, rho: float, ratio: float, n: int,
                   law: theory.UpdateLaw) -> float:
    """``R_0`` times :func:`theory.predicted_rounds` at the fitted ``c`` and ``p`` (the model
    ``adaptive_calibrated`` plans with, up to ``R_0``), uniform ``q``, ``rho`` and estimates."""
    full = lambda x: np.full(n, x, np.float32)
    law = dataclasses.replace(law, progress_power=fitted["p"])
    return fitted["r0"] * float(theory.predicted_rounds(full(q), full(rho), full(ratio), full(1.0 / n),
                                                        fitted["c"], 1.0, law=law))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/calibrate_rounds")
    ap.add_argument("--runs", default="runs/calibrate_rounds")
    ap.add_argument("--seeds", default="1000,1001,1002,1003", help="tuning seeds only (never 0-19)")
    ap.add_argument("--participants", default="0.8,1,2,4,16",
                    help="expected participants K (q = K/16; 0.8: the solver's q_min)")
    ap.add_argument("--ratios", default="0.25,0.5,1", help="sketch ratios rho (k/4)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--lr", type=float, default=1e-2, help="client step (adaptive's tuned one)")
    ap.add_argument("--target", type=float, default=0.8, help="validation accuracy target")
    ap.add_argument("--estimate-round", type=int, default=10)
    args = ap.parse_args()
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.participants = [float(x) for x in args.participants.split(",")]
    args.ratios = [float(x) for x in args.ratios.split(",")]

    pilot = load_config(None, [], preset="tiny").federation.participants  # adaptive's pilot K
    if pilot not in args.participants or 1.0 not in args.ratios:
        raise SystemExit(f"--participants must hold the preset's {pilot:g} and --ratios 1: the "
                         "estimates are read at the pilot's setting (q = K/N, full rank).")
    start = time.time()
    done, cfgs = run_grid(args)
    host_s = time.time() - start
    n = next(iter(cfgs.values())).data.num_clients
    law = theory.update_law(args.optimizer)
    ratio = {}  # per seed: G^2 / |g|^2 at the pilot's setting, round --estimate-round
    for seed in args.seeds:
        row = next(r for r in done[(pilot, 1.0, seed)] if r.get("round") == args.estimate_round)
        ratio[seed] = row["est_g2_mean"] / row["est_signal"]
    points = []
    for (k, rho, seed), rows in done.items():
        noise, s = noise_and_shrink(min(k / n, 1.0), rho, ratio[seed], n, law)
        points.append({"participants": k, "q": min(k / n, 1.0), "rho": rho, "seed": seed,
                       "rounds_to_target": rounds_to(rows, args.target), "noise": noise, "shrink": s})
    hit = [p for p in points if np.isfinite(p["rounds_to_target"])]
    arr = lambda key: np.array([p[key] for p in points])
    missed = ~np.isfinite(arr("rounds_to_target"))  # censored: needs more than --rounds
    log_r = np.log(np.where(missed, args.rounds + 1, arr("rounds_to_target")))
    noise, s = arr("noise"), arr("shrink")
    # p is identifiable only where a sketch shrinks the step (Adam); SGD's law keeps s = 1
    calibrated = fit(log_r, noise, s, {} if law.shrink_power else {"p": law.progress_power},
                     censored=missed)
    assumed = fit(log_r, noise, s, {"c": 1.0, "p": law.progress_power}, censored=missed)
    for point, log_fit in zip(points, model(params(calibrated), noise, s)):  # the fit is theory's
        assert np.isclose(np.exp(log_fit), library_rounds(calibrated, point["q"], point["rho"],
                                                          ratio[point["seed"]], n, law), rtol=1e-4)
    typical = float(np.median(list(ratio.values())))
    predicted = lambda fitted, k, rho: library_rounds(fitted, min(k / n, 1.0), rho, typical, n, law)
    table = {}
    for p in points:
        table.setdefault((p["participants"], p["rho"]), []).append(p["rounds_to_target"])
    summary = [{"participants": k, "rho": rho, "median": float(np.median(r)),  # a miss: inf
                "rounds_to_target": [x if np.isfinite(x) else None for x in r],  # a miss: None
                "predicted_calibrated": predicted(calibrated, k, rho),
                "predicted_assumed": predicted(assumed, k, rho)} for (k, rho), r in table.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/calibrate_rounds.py " + " ".join(
                  f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k not in ("out", "runs")),
              "law": args.optimizer, "target": args.target, "seeds": args.seeds,
              "g2_over_signal": ratio, "runs": len(points), "missed": len(points) - len(hit),
              "host_s_finished_runs_reused_count_as_0": round(host_s), "calibrated": calibrated, "assumed": assumed,
              "settings": summary}
    (out / "calibration.json").write_text(json.dumps(result, indent=2))
    with open(Path(args.runs) / "runs.jsonl", "rb") as f, gzip.open(out / "runs.jsonl.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    print(f"{len(points)} runs ({len(points) - len(hit)} missed the target {args.target}), {host_s:.0f} s")
    print(f"G^2/|g|^2 per seed: {ratio}")
    for row in summary:
        print(f"K={row['participants']:g} rho={row['rho']:g}: rounds {row['rounds_to_target']} "
              f"(median {row['median']:g}); predicted {row['predicted_calibrated']:.1f} calibrated, "
              f"{row['predicted_assumed']:.1f} assumed")
    print(f"calibrated: c = {calibrated['c']:.4g}, p = {calibrated['p']:.3g}, R_0 = {calibrated['r0']:.3g}, "
          f"rms log residual {calibrated['rms_log_residual']:.3f}")
    print(f"assumed (c = 1, p = {law.progress_power}): R_0 = {assumed['r0']:.3g}, "
          f"rms log residual {assumed['rms_log_residual']:.3f}")


if __name__ == "__main__":
    main()
