"""``adaptive`` (the paper, arXiv 2505.23555): sampling probabilities and sketch ratios that
minimize the predicted wall-clock time (rounds to accuracy times ``E[T](q, rho)``), re-solved as
estimates improve.

- Pilot: the first ``pilot_rounds`` rounds sample uniformly at full rank, to measure ``G_n^2``.
- Then, and every ``resolve_every`` rounds, :mod:`fedlora_jax.solver` solves for ``(q, rho)`` with
  ``G_n^2`` and the signal ``|g|^2`` estimated online (:func:`base.observe`). ``alpha = 1/|g|^2``,
  ``beta = 1``: rounds grow as ``1 + V / |g|^2``, the gradient-noise-scale law (McCandlish et al.
  2018: steps ``S = S_min (1 + B_noise / B)``); only ``beta / alpha`` matters to the argmin. How a
  sketch enters ``V`` and the step follows the client optimizer (:func:`theory.update_law`): for
  Adam-type clients sketching also shrinks the mean update, which costs rounds.
- Independent sampling with ``1 / q_n`` aggregation; adaptive bandwidth allocation.

Ablations are flags: ``sampling_only`` (``rho = 1``, only ``q`` optimized: Luo et al.'s adaptive
sampling, registered as ``luo``), ``sketch_only`` (``q`` uniform, only ``rho`` optimized) and
``bandwidth='equal'`` (equal split of the band; the solver still models adaptive allocation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import solver as solver_lib
from fedlora_jax import theory
from fedlora_jax.strategies.base import Context, Estimates, Plan, Strategy


@dataclasses.dataclass(frozen=True)
class Adaptive(Strategy):
    """The paper's strategy and its ablations.

    Attributes:
      pilot_rounds: uniform full-rank rounds before the first solve.
      resolve_every: re-solve every this many rounds after the first solve.
      sampling_only: optimize ``q`` at ``rho = 1`` (no sketch).
      sketch_only: optimize ``rho`` at the uniform ``q``.
      bandwidth: ``adaptive`` (equal finish times) or ``equal`` split of the band.
      q_min: smallest sampling probability the solver may give.
      noise_scale: the rounds model's noise weight ``c``, ``alpha = c / |g|^2`` (the paper's: 1).
      progress_power: the rounds a shrunk mean step costs, ``s^-p``; None: the update law's
        (``adaptive_calibrated`` sets both to values fitted against training, docs/method.md).
    """

    name: str = "adaptive"
    pilot_rounds: int = 2
    resolve_every: int = 5
    sampling_only: bool = False
    sketch_only: bool = False
    bandwidth: str = "adaptive"
    q_min: float = 0.05
    noise_scale: float = 1.0
    progress_power: float | None = None

    def __post_init__(self):
        if self.sampling_only and self.sketch_only:
            raise ValueError(f"{self.name}: sampling_only and sketch_only exclude each other.")
        if self.bandwidth not in ("adaptive", "equal"):
            raise ValueError(f"{self.name}: bandwidth must be 'adaptive' or 'equal', "
                             f"got {self.bandwidth!r}.")
        if self.pilot_rounds < 0 or self.resolve_every < 1:
            raise ValueError(f"{self.name}: need pilot_rounds >= 0 and resolve_every >= 1.")
        if not 0 < self.q_min < 1:
            raise ValueError(f"strategy_options.q_min must be in (0, 1) (the smallest sampling "
                             f"probability {self.name} may give), got {self.q_min!r}.")
        if not 0 < self.noise_scale < float("inf"):
            raise ValueError(f"strategy_options.noise_scale must be a positive number (the rounds "
                             f"model's noise weight; 1 is the paper's), got {self.noise_scale!r}.")
        if self.progress_power is not None and not np.isfinite(self.progress_power):
            raise ValueError(f"strategy_options.progress_power must be a finite number (e.g. 0.5, "
                             f"the AdamW law's) or unset, got {self.progress_power!r}.")

    def settings(self) -> dict[str, tuple[Any, str]]:
        sketch = ((1.0, f"{self.name} does not sketch (sampling only)") if self.sampling_only else
                  (None, f"{self.name} chooses every client's sketch ratio"))
        return {**super().settings(), "federation.sketch_ratio": sketch,
                "bandwidth_allocation": (self.bandwidth, f"{self.name} allocates bandwidth "
                                                         f"'{self.bandwidth}'")}

    def due(self, round: int) -> bool:
        after = round - self.pilot_rounds - 1
        return round == 1 or (after >= 0 and after % self.resolve_every == 0)

    def law(self, optimizer: str) -> theory.UpdateLaw:
        """The client optimizer's update law, with ``progress_power`` if set."""
        law = theory.update_law(optimizer)
        return law if self.progress_power is None else dataclasses.replace(
            law, progress_power=self.progress_power)

    def plan(self, round: int, ctx: Context, est: Estimates) -> Plan:
        if round <= self.pilot_rounds or est.signal <= 0:
            return ctx.uniform()
        cfg = solver_lib.SolverConfig(
            q_min=min(self.q_min, ctx.q_default), rank=1 if self.sampling_only else ctx.rank,
            baseline_q=ctx.q_default, baseline_rho=1.0 if self.sampling_only else 1 / ctx.rank)
        problem = solver_lib.make_problem(ctx.profile, ctx.system, ctx.workload, est.g2,
                                          ctx.weights, self.noise_scale / est.signal, 1.0,
                                          law=self.law(ctx.client_optimizer),
                                          overhead_s=ctx.round_overhead_s)
        if self.sketch_only:
            return ctx.uniform(np.asarray(sketch_only_ranks(problem, ctx.q_default, cfg)))
        result = solver_lib.solve_problem(problem, jax.random.key(round), cfg)
        k = np.full(ctx.num_clients, ctx.rank) if self.sampling_only else np.asarray(result.k)
        return Plan(np.asarray(result.q, np.float32), k.astype(np.int32))


def sketch_only_ranks(problem: solver_lib.Problem, q: float, cfg: solver_lib.SolverConfig) -> jax.Array:
    """Kept ranks minimizing ``J`` at a fixed uniform ``q``: projected gradient in ``log rho`` from
    ``rho = 1``, rounded to the grid, never worse than ``rho = 1``. The rank and bounds are traced
    (``cfg.box()``), so a new rank does not recompile."""
    return _sketch_only_ranks(problem, q, cfg.box(), cfg.numerics())


@functools.partial(jax.jit, static_argnames="numerics")
def _sketch_only_ranks(problem: solver_lib.Problem, q: float, box: solver_lib.Box,
                       numerics: solver_lib.SolverConfig) -> jax.Array:
    n = problem.a.shape[0]
    q = jnp.full(n, q)
    objective = lambda rho: solver_lib.objective_terms(problem, q, rho, numerics)["objective"]
    x, *_ = solver_lib.minimize_box(lambda x: jnp.log(objective(jnp.exp(x))), jnp.zeros(n),
                                   jnp.full(n, -jnp.log(box.rank)), jnp.zeros(n), numerics.max_iters,
                                   numerics.xtol)
    k = solver_lib.round_rho(jnp.exp(x), box.rank)
    full = jnp.full(n, box.rank)
    better = objective(k / box.rank) <= objective(jnp.ones(n))
    return jnp.where(better, k, full)
