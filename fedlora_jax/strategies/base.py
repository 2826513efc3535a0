"""What every strategy shares: the run it plans for, the estimates it learns from, its plan.

A strategy is one value holding a whole federated method: a frozen dataclass whose host-side
planner chooses, before a round, each client's sampling probability ``q_n`` and kept rank ``k_n``
(:class:`Plan`; asked again only on the rounds it says are :meth:`Strategy.due`, revised after a
round by :meth:`Strategy.revise`), whose :meth:`Strategy.rule` is the traced aggregation rule the
engine runs (:class:`~fedlora_jax.aggregation.Rule`), and whose :meth:`Strategy.costs` is what a
round costs beyond local training (:class:`~fedlora_jax.aggregation.Costs`). It also pins the run
settings it defines (:meth:`Strategy.settings`: the sampling scheme, the sketch ratio, the
bandwidth allocation); a setting the user changed from its default to something else is a
contradiction, rejected with the strategy's reason.

The estimates (:class:`Estimates`) are host-side and updated after every round by :func:`observe`:
``G_n^2`` from the clients' update norms, mapped to unsketched norms by the client optimizer's
update law (:func:`fedlora_jax.theory.update_law`), and the signal ``|g|^2``, the squared norm of
the full-participation mean update, from the applied update ``|D|^2``:
``E|D|^2 = s^2 |g|^2 + V`` (``s``: the law's step shrink, 1 for SGD).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import solver, theory, wireless
from fedlora_jax.aggregation import AdapterSizes, Costs, Rule, adapter_costs, sketched
from fedlora_jax.engine import FederationConfig, RoundResult
from fedlora_jax.lora import LoRAConfig


class Plan(NamedTuple):
    """Per-client sampling probabilities ``q`` (N,) and kept ranks ``k`` (N,) for a round."""

    q: np.ndarray
    k: np.ndarray


@dataclasses.dataclass(frozen=True)
class Context:
    """What a strategy may know of the run.

    Attributes:
      rank: global LoRA rank ``r``.
      q_default: ``participants / N`` (clipped to 1): the uniform sampling rate.
      sketch_ratio: the configured ``rho`` (``federation.sketch_ratio``).
      weights: data weights ``a_n`` (N,).
      profile, system, workload: the simulated network and per-client work (as the clock uses them).
      round_overhead_s: seconds every round costs besides the clients' phase (the broadcast of
        the global adapter and the server's work under the run's aggregation rule).
      client_optimizer: the clients' optimizer name; selects :func:`theory.update_law`.
    """

    rank: int
    q_default: float
    sketch_ratio: float
    weights: np.ndarray
    profile: wireless.SystemProfile
    system: wireless.SystemConfig
    workload: wireless.WorkloadModel
    round_overhead_s: float = 0.0
    client_optimizer: str = "sgd"

    @property
    def num_clients(self) -> int:
        return int(self.weights.shape[0])

    def uniform(self, k: int | np.ndarray | None = None) -> Plan:
        """Every client at ``q_default``, with ``k`` (default: the full rank)."""
        n = self.num_clients
        k = self.rank if k is None else k
        return Plan(np.full(n, self.q_default, np.float32),
                    np.broadcast_to(np.asarray(k, np.int32), (n,)).copy())


@jax.tree_util.register_dataclass  # a pytree: checkpointed with the run's state
@dataclasses.dataclass(frozen=True)
class Estimates:
    """Online estimates: ``G_n^2`` (:class:`theory.GradNormState`) and the signal ``|g|^2``."""

    grad_norms: theory.GradNormState
    signal: float = 0.0
    reports: int = 0  # rounds folded into ``signal``

    @property
    def g2(self) -> np.ndarray:
        return np.asarray(theory.grad_norm_estimate(self.grad_norms))


def init_estimates(num_clients: int) -> Estimates:
    return Estimates(theory.init_grad_norms(num_clients))


def observe(est: Estimates, ctx: Context, plan: Plan, participants: np.ndarray,
            update_sq_norms: np.ndarray, applied_sq_norm: float, pilot: int = 5,
            decay: float = 0.9, head_sq_norms: np.ndarray | None = None) -> Estimates:
    """Folds one round into the estimates.

    ``update_sq_norms`` are the participants' ``|delta_n|^2``, mapped to the unsketched ``G_n^2`` by
    the client optimizer's :func:`theory.update_law` (``ctx.client_optimizer``);
    ``applied_sq_norm`` is ``|D|^2`` of the round's aggregate. ``E|D|^2 = s^2 |g|^2 + V_law``
    (:func:`theory.aggregate_variance`, :func:`theory.step_shrink`), so the signal sample is
    ``(|D|^2 - V_law) / s^2`` at the current ``G_n^2``, its numerator floored at a tenth of
    ``|D|^2``; mean of the first ``pilot`` rounds, then an EMA. ``head_sq_norms``: the part of each
    ``|delta_n|^2`` from never-sketched parameters (heads), which the law leaves as it is.
    """
    law = theory.update_law(ctx.client_optimizer)
    n = ctx.num_clients
    mask = np.zeros(n, bool)
    mask[participants] = True
    sq = np.zeros(n, np.float32)
    sq[participants] = update_sq_norms
    head = np.zeros(n, np.float32)
    if head_sq_norms is not None:
        head[participants] = head_sq_norms
    rho = jnp.asarray(plan.k / ctx.rank, jnp.float32)
    grad_norms = theory.update_grad_norms(est.grad_norms, jnp.asarray(mask), jnp.asarray(sq), rho,
                                          pilot=pilot, decay=decay, law=law,
                                          head_sq_norms=jnp.asarray(head))
    if not participants.size:
        return dataclasses.replace(est, grad_norms=grad_norms)
    g2, a = theory.grad_norm_estimate(grad_norms), jnp.asarray(ctx.weights)
    v = float(theory.aggregate_variance(jnp.asarray(plan.q), rho, g2, a, law))
    s = float(theory.step_shrink(rho, a, law))
    sample = max(applied_sq_norm - v, 0.1 * applied_sq_norm) / s ** 2
    reports = est.reports + 1
    weight = 1.0 / reports if reports <= pilot else 1.0 - decay
    return Estimates(grad_norms, est.signal + weight * (sample - est.signal), reports)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base of the strategies: uniform sampling at the configured rate, full rank, planned once,
    FSLoRA's rule and the whole adapter's costs.

    Subclasses set ``name`` (the registry key) and ``sampling`` (the engine's scheme) and override
    what their method changes: the planner (:meth:`plan`, :meth:`due`, :meth:`revise`,
    :meth:`settings`, :meth:`adapt_model`), the :meth:`rule` and the :meth:`costs`.
    """

    name: str = "fixed"
    sampling: ClassVar[str] = "independent"

    def settings(self) -> dict[str, tuple[Any, str]]:
        """Run settings this strategy pins: dotted key -> (value, why); a ``None`` value means the
        setting is unused and must stay at its default."""
        return {"federation.sampling": (self.sampling, f"{self.name} samples clients "
                                                       f"'{self.sampling}'")}

    def adapt_model(self, model) -> None:
        """Changes the LoRA model in place before it is split (FFA-LoRA freezes ``A``)."""

    def rule(self, lora: LoRAConfig, federation: FederationConfig) -> Rule:
        """How the engine starts clients and aggregates their updates (default: FSLoRA's rule,
        random sketches and ``a_n I_n / q_n``-weighted deltas; :func:`aggregation.sketched`)."""
        del lora
        return sketched(federation.shared_sketch)

    def costs(self, sizes: AdapterSizes, rank: int) -> Costs:
        """What a round costs beyond local training, for trainables of ``sizes`` at global rank
        ``rank`` (default: the whole adapter and heads each way, no server work)."""
        return adapter_costs(sizes, rank)

    def revise(self, plan: Plan, result: RoundResult) -> Plan:
        """The plan for the next round, after seeing a round's result (HetLoRA prunes ranks)."""
        del result
        return plan

    def due(self, round: int) -> bool:
        """Whether to plan again before 1-based ``round`` (round 1 is always planned)."""
        return round == 1

    def plan(self, round: int, ctx: Context, est: Estimates) -> Plan:
        """The clients' ``q`` and ``k`` for 1-based ``round``, from what the run is (``ctx``) and
        what has been learned of it (``est``)."""
        del round, est
        return ctx.uniform()


@dataclasses.dataclass(frozen=True)
class TieredRanks(Strategy):
    """The planner of the heterogeneous-rank methods (FSLoRA, HetLoRA, FlexLoRA, FLoRA): uniform
    ``K`` of ``N`` sampling, client ranks ``k_n = ratio * r`` by compute tier (:func:`tier_ranks`),
    so all of them give a client the same compute and upload budget and differ only in their rule.
    """

    ratios: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)
    sampling: ClassVar[str] = "uniform"

    def __post_init__(self):
        if not self.ratios or any(not 0 < r <= 1 for r in self.ratios):
            raise ValueError(f"{self.name} ratios must be a non-empty tuple in (0, 1], "
                             f"got {self.ratios!r}.")

    def settings(self) -> dict[str, tuple[Any, str]]:
        return {**super().settings(),
                "federation.sketch_ratio": (None, f"{self.name} sets each client's ratio from "
                                                  f"its compute tier {self.ratios}")}

    def plan(self, round: int, ctx: Context, est: Estimates) -> Plan:
        del round, est
        return ctx.uniform(tier_ranks(np.asarray(ctx.profile.flops_per_s), self.ratios, ctx.rank))


def ratio_rank(ratio, rank: int) -> np.ndarray:
    """Host-side kept ranks ``k = round(rho r)`` in ``[1, r]`` (:func:`solver.round_rho`)."""
    return np.asarray(solver.round_rho(jnp.asarray(ratio), rank))


def tier_ranks(speeds: np.ndarray, ratios: tuple[float, ...], rank: int) -> np.ndarray:
    """Kept ranks by compute tier: clients ranked by ``speeds`` split into ``len(ratios)`` near-equal
    tiers, the ``i``-th slowest tier getting the ``i``-th smallest ratio."""
    tier = np.empty(speeds.size, np.int64)
    tier[np.argsort(speeds, kind="stable")] = np.arange(speeds.size) * len(ratios) // speeds.size
    return ratio_rank(np.sort(np.asarray(ratios))[tier], rank)
