"""Joint sampling probabilities and sketch ratios (docs/method.md, 'Solver').

    min_{q in [q_min, 1]^N, rho in [1/r, 1]^N}  J(q, rho) = (alpha V(q, rho) + beta) * E[C](q, rho)

with ``V`` from :mod:`fedlora_jax.theory` and ``E[C] = overhead_s + E[max(T, min_round_s)]`` the
expected cost of a round, empty rounds included, ``E[.]`` a smooth surrogate from
:mod:`fedlora_jax.wireless` (the normal-approximation one by default: the most faithful, see
docs/method.md). A :class:`Problem` holds per-client arrays (:class:`wireless.ClientArrays`: a
user's own compute seconds, upload bits and SNR per Hz, or built from a profile by
:func:`make_problem`), in float32 or float64.

The problem is non-convex and its optima sit on the bounds, so we run projected gradient descent
on ``log J`` in the variables ``(log q, log rho)`` (a box: projection is a clip) with
Barzilai-Borwein steps and a backtracking Armijo line search, from several starts -- the uniform,
fixed-ratio and full baselines, starts from the problem's structure (everyone at ``q = 1`` or
``q_min``, with the slow clients sketched down, everyone at ``rho = 1/r``, or at full rank) and
random points, vmapped -- for up to ``multistart_max_clients`` clients. ``rho`` is then rounded
to the grid ``k / r`` and ``q`` re-polished at the rounded ``rho``; from the best polished start a
coordinate search on the grid moves one client's ``q`` or ``k`` at a time (the surrogate is a
sawtooth along a slow client's ``rho``, where the gradient stalls), and the result is never
returned worse than the baselines. Above ``multistart_max_clients`` clients only the best of the
non-random starts is rounded and polished.
Clients are padded to a few bucket sizes, so a sweep over the client count compiles once per
bucket; the bandwidth, the round cost and the box (rank, bounds,
baselines: :class:`Box`) are traced values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedlora_jax import theory, wireless
from fedlora_jax.fields import require

SURROGATES = ("normal", "demand")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Bounds, baselines and numerics of the allocation solver.

    Attributes:
      rank: global LoRA rank ``r`` of the run (required: the grid ``k / r`` depends on it); ``rho``
        ranges over ``[1/r, 1]`` and is rounded to ``k/r``.
      q_min: smallest sampling probability, in (0, 1].
      baseline_q: the uniform-sampling baseline's probability (clipped to ``[q_min, 1]``).
      baseline_rho: the fixed-ratio (FSLoRA) baseline's sketch ratio, on the grid ``k/r``
        (default: the grid point nearest 1/4).
      restarts: random starts in addition to the 3 baselines and the 8 structured starts ...
      multistart_max_clients: ... descended from up to this many clients; above, only the best of
        the non-random starts (by objective value) is, with the ``large_*`` numerics (restarts
        matter most for few clients, and cost the most for many).
      max_iters: projected-gradient iterations per start and descent (and again for the polish
        after rounding).
      max_backtracks: line-search backtracks per iteration.
      descents: descents in the box from every start before rounding, each restarted where the
        last ended (0: the start's ``rho`` is rounded and only ``q`` descended).
      search_rounds: rounds of the coordinate search from the best polished start (one move of one
        client's ``q`` or grid ``rho`` a round, the best of all such moves; stops sooner when none
        lowers ``J``); 0 above ``multistart_max_clients``.
      xtol: stop when no ``log q`` or ``log rho`` moves by more than this in an iteration ...
      ftol, patience: ... or after ``patience`` iterations that lower ``log J`` by less than ``ftol``.
      surrogate: expected-round-time surrogate, ``normal`` (default) or ``demand``.
      quad_points: Gauss-Legendre nodes per piece of the normal surrogate.
      support_iters: regula falsi steps for the normal surrogate's integration range.
      large_quad_points, large_support_iters, large_ftol, large_patience, large_max_backtracks,
        large_descents: the same above ``multistart_max_clients`` clients, where the round time is a
        sum over many clients (a smooth, narrow law) and one evaluation costs the most.
      bisect_iters: bisection steps of the demand surrogate's root (float32: 40 is at machine precision).
      seed: PRNG seed of the random starts.
    """

    rank: int
    q_min: float = 0.05
    baseline_q: float = 0.2
    baseline_rho: float | None = None
    restarts: int = 4
    multistart_max_clients: int = 500
    max_iters: int = 100
    max_backtracks: int = 8
    descents: int = 1
    search_rounds: int = 16
    xtol: float = 1e-4
    ftol: float = 1e-6
    patience: int = 5
    surrogate: str = "normal"
    quad_points: int = 24
    support_iters: int = 12
    large_quad_points: int = 8
    large_support_iters: int = 4
    large_ftol: float = 1e-3
    large_patience: int = 2
    large_descents: int = 0
    large_max_backtracks: int = 3
    bisect_iters: int = 40
    seed: int = 0

    def __post_init__(self):
        require(isinstance(self.rank, int) and self.rank >= 1, "SolverConfig.rank", self.rank,
                "be an int >= 1", "give the run's LoRA rank")
        rho, r = self.fixed_ratio, self.rank
        require(0 < self.q_min <= 1, "SolverConfig.q_min", self.q_min, "be a probability in (0, 1]", "e.g. 0.05")
        require(0 < self.baseline_q <= 1, "SolverConfig.baseline_q", self.baseline_q, "be a probability in (0, 1]")
        require(1 / r <= rho <= 1 and float(rho * r).is_integer(), "SolverConfig.baseline_rho", self.baseline_rho,
                f"be k / {r} for an integer 1 <= k <= {r}")
        require(self.restarts >= 0, "SolverConfig.restarts", self.restarts, "be a count >= 0")
        require(self.max_iters >= 1, "SolverConfig.max_iters", self.max_iters, "be a count >= 1")
        for name in ("descents", "large_descents", "search_rounds"):
            require(getattr(self, name) >= 0, f"SolverConfig.{name}", getattr(self, name), "be a count >= 0")
        for name in ("patience", "large_patience", "max_backtracks", "large_max_backtracks"):
            require(getattr(self, name) >= 1, f"SolverConfig.{name}", getattr(self, name), "be a count >= 1")
        require(self.surrogate in SURROGATES, "SolverConfig.surrogate", self.surrogate, f"be one of {SURROGATES}")
        for name in ("quad_points", "large_quad_points"):
            require(getattr(self, name) >= 3, f"SolverConfig.{name}", getattr(self, name), "be at least 3 (nodes)")
        for name in ("support_iters", "large_support_iters"):
            require(getattr(self, name) >= 4, f"SolverConfig.{name}", getattr(self, name), "be at least 4")
        for name in ("xtol", "ftol", "large_ftol"):
            require(getattr(self, name) >= 0, f"SolverConfig.{name}", getattr(self, name), "be >= 0")
        require(self.bisect_iters >= 10, "SolverConfig.bisect_iters", self.bisect_iters, "be at least 10")

    def for_clients(self, n: int) -> SolverConfig:
        """The config a solve of ``n`` (padded) clients runs with: the ``large_*`` numerics above
        ``multistart_max_clients``."""
        if n <= self.multistart_max_clients:
            return self
        return dataclasses.replace(self, quad_points=self.large_quad_points,
                                   support_iters=self.large_support_iters, ftol=self.large_ftol,
                                   patience=self.large_patience, max_backtracks=self.large_max_backtracks,
                                   descents=self.large_descents, search_rounds=0)

    @property
    def fixed_ratio(self) -> float:
        """The fixed-ratio baseline's ``rho``: ``baseline_rho``, or the grid point nearest 1/4."""
        return max(1, round(self.rank / 4)) / self.rank if self.baseline_rho is None else self.baseline_rho

    def box(self) -> Box:
        """The bounds and baselines, as the traced :class:`Box` the jitted solver takes."""
        return Box(rank=self.rank, q_min=self.q_min, baseline_q=max(self.baseline_q, self.q_min),
                   fixed_ratio=self.fixed_ratio)

    def numerics(self) -> SolverConfig:
        """The static part, the jitted solver's cache key: the box and the seed set to one
        canonical value, so configs that differ only there share one compilation."""
        return dataclasses.replace(self, rank=1, q_min=1.0, baseline_q=1.0, baseline_rho=1.0, seed=0)


@struct.dataclass
class Box:
    """Bounds ``q in [q_min, 1]``, ``rho = k / rank`` in ``[1/rank, 1]``, and the baselines'
    ``q`` and ``rho``: traced values (Python scalars stay weakly typed)."""

    rank: int | jax.Array
    q_min: float | jax.Array
    baseline_q: float | jax.Array
    fixed_ratio: float | jax.Array


@struct.dataclass
class Problem:
    """One scenario as arrays (stack many on a leading axis for solve_batch): clients are rows.

    A round costs ``overhead_s + max(T(P), min_round_s)`` seconds for its participants ``P``, empty
    rounds included (``T`` of the empty set is 0): the objective charges every round it counts.
    """

    clients: wireless.ClientArrays  # (N,) each: compute seconds and bits affine in rho, p h / N0
    g2: jax.Array           # (N,) G_n^2, the squared norms of the unsketched updates
    a: jax.Array            # (N,) data weights
    valid: jax.Array        # (N,) bool; False for the padding, which never takes part
    alpha: jax.Array        # ()
    beta: jax.Array         # ()
    bandwidth_hz: jax.Array  # () a traced value: a new bandwidth does not recompile
    overhead_s: jax.Array   # () seconds every round costs besides the clients (broadcast, server)
    min_round_s: jax.Array  # () no round, empty ones included, is shorter than this
    law: theory.UpdateLaw = struct.field(pytree_node=False, default=theory.SGD_LAW)  # client optimizer's

    @property
    def num_clients(self) -> int:
        return self.a.shape[-1]


@struct.dataclass
class SolveResult:
    q: jax.Array                    # (N,)
    rho: jax.Array                  # (N,) on the grid k / r
    k: jax.Array                    # (N,) int
    objective: jax.Array            # J(q, rho)
    expected_round_time: jax.Array  # E[T] (surrogate), round cost included
    predicted_rounds: jax.Array     # alpha V + beta
    baselines: dict[str, dict[str, jax.Array]]  # name -> its objective_terms (objective, E[T], rounds)


def make_problem_from_arrays(clients: wireless.ClientArrays, bandwidth_hz: float, g2: jax.Array, a: jax.Array,
                             alpha: float, beta: float, *, overhead_s: float, min_round_s: float = 0.0,
                             law: theory.UpdateLaw = theory.SGD_LAW, dtype=jnp.float32) -> Problem:
    """Check the inputs (before any expensive work) and pack them as a :class:`Problem`.

    ``clients``: per-client :class:`wireless.ClientArrays`; ``g2``: ``G_n^2``; ``law``: the clients'
    :class:`theory.UpdateLaw`; ``overhead_s``: the seconds every round costs besides the clients'
    compute and upload (the broadcast of the global adapter, the server's aggregation), charged to
    empty rounds too; ``min_round_s``: the shortest a round can be. ``dtype=jnp.float64`` needs
    ``jax.enable_x64``.
    """
    wireless.validate_client_arrays(clients)
    n = np.shape(clients.snr_bw)[0]
    for name, x in (("G2", g2), ("a", a)):
        x = np.asarray(x)
        require(x.shape == (n,), f"{name}.shape", x.shape, f"be ({n},), one value per client")
        require(np.isfinite(x) & (x >= 0), name, f"min {x.min()}", "be finite and >= 0 at every client")
    for name, x, fix in (("alpha", alpha, "fit it with theory.fit_alpha_beta"),
                         ("beta", beta, "fit it with theory.fit_alpha_beta"),
                         ("bandwidth_hz", bandwidth_hz, "give the total bandwidth in Hz, e.g. 10e6")):
        require(np.isfinite(x) and x > 0, name, x, "be finite and > 0", fix)
    for name, x in (("overhead_s", overhead_s), ("min_round_s", min_round_s)):
        require(np.isfinite(x) and x >= 0, name, x, "be finite seconds >= 0")
    require(jnp.zeros((), dtype).dtype == jnp.dtype(dtype), "dtype", jnp.dtype(dtype).name,
            "be a dtype jax has enabled", "float64 needs x64: wrap the call in `with jax.enable_x64(True):`")
    cast = lambda x: jnp.asarray(x, dtype)
    return Problem(clients=jax.tree.map(cast, clients), g2=cast(g2), a=cast(a), valid=jnp.ones(n, bool),
                   alpha=cast(alpha), beta=cast(beta), bandwidth_hz=cast(bandwidth_hz),
                   overhead_s=cast(overhead_s), min_round_s=cast(min_round_s), law=law)


def make_problem(profile: wireless.SystemProfile, sys: wireless.SystemConfig, workload: wireless.WorkloadModel,
                 g2: jax.Array, a: jax.Array, alpha: float, beta: float, *, overhead_s: float,
                 min_round_s: float = 0.0, law: theory.UpdateLaw = theory.SGD_LAW, dtype=jnp.float32) -> Problem:
    """:func:`make_problem_from_arrays` for a :class:`wireless.SystemProfile` (FLOP/s, power, gain),
    the system's bandwidth and noise, and a :class:`wireless.WorkloadModel`."""
    wireless.validate_profile(profile)
    profile = jax.tree.map(lambda x: jnp.asarray(x, dtype), profile)
    return make_problem_from_arrays(wireless.client_arrays(profile, sys, workload), sys.bandwidth_hz, g2, a,
                                    alpha, beta, overhead_s=overhead_s, min_round_s=min_round_s, law=law,
                                    dtype=dtype)


def bucket_size(n: int) -> int:
    """Padded client count: the next power of two, at least 16 (a sweep over N compiles once per bucket)."""
    return max(16, 1 << (n - 1).bit_length())


def pad_problem(problem: Problem, size: int) -> Problem:
    """``problem`` with its clients padded to ``size``: copies of client 0 that never take part
    (``valid`` False, ``a = G^2 = 0``), so the objective is unchanged."""
    pad = size - problem.num_clients
    require(pad >= 0, "pad_problem.size", size, f"be at least the {problem.num_clients} clients")
    edge = lambda x: jnp.concatenate([x, jnp.repeat(x[..., :1], pad, axis=-1)], axis=-1)
    zeros = lambda x: jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (pad,), x.dtype)], axis=-1)
    return problem.replace(clients=jax.tree.map(edge, problem.clients), g2=zeros(problem.g2),
                           a=zeros(problem.a), valid=zeros(problem.valid))


def expected_round_time(problem: Problem, q: jax.Array, rho: jax.Array, cfg: SolverConfig) -> jax.Array:
    """The configured smooth surrogate of the expected round cost ``E[wireless.round_cost(T)]``
    ``= overhead_s + E[max(T, min_round_s)]`` (the rule is affine above the minimum, and the
    surrogates give ``E[max(T, m)] >= m``); padded clients have ``q = 0``."""
    times = problem.clients.times(rho)
    q = jnp.where(problem.valid, q, 0.0)
    if cfg.surrogate == "normal":
        clients = wireless.expected_round_time_normal(times, q, problem.bandwidth_hz, cfg.quad_points,
                                                      iters=cfg.support_iters, min_round_s=problem.min_round_s)
    else:
        clients = jnp.maximum(wireless.expected_round_time_demand(times, q, problem.bandwidth_hz, cfg.bisect_iters),
                              problem.min_round_s)
    return wireless.round_cost(clients, problem.overhead_s, problem.min_round_s)


def predicted_rounds(problem: Problem, q: jax.Array, rho: jax.Array) -> jax.Array:
    """The rounds ``alpha V + beta`` of :mod:`fedlora_jax.theory` at ``(q, rho)`` (padding masked)."""
    keep = lambda x: jnp.where(problem.valid, x, 1.0)  # padding: a = G^2 = 0, and no 1/0
    return theory.predicted_rounds(keep(q), keep(rho), problem.g2, problem.a, problem.alpha, problem.beta,
                                   law=problem.law)


def objective_terms(problem: Problem, q: jax.Array, rho: jax.Array, cfg: SolverConfig) -> dict[str, jax.Array]:
    """``J``, ``E[T]`` and the rounds ``alpha V + beta`` at ``(q, rho)``."""
    rounds = predicted_rounds(problem, q, rho)
    time = expected_round_time(problem, q, rho, cfg)
    return {"objective": rounds * time, "expected_round_time": time, "predicted_rounds": rounds}


# ----------------------------------------------------------------------------- projected gradient

def minimize_box(f: Callable[[jax.Array], jax.Array], x0: jax.Array, lo: jax.Array, hi: jax.Array,
                 max_iters: int, xtol: float, memory: int = 1, max_backtracks: int = 8, ftol: float = 1e-6,
                 patience: int = 5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected gradient with Barzilai-Borwein steps on ``lo <= x <= hi``; returns
    ``(x, f(x), f(x0))``.

    Each iteration moves to the projection of ``x - s g`` (``s``: the BB1 step ``|dx|^2 / dx.dg``;
    the first moves by 1 the largest coordinate that its bounds let move), backtracking along the
    move until ``f`` is below the largest of the last ``memory`` values (the nonmonotone Armijo rule
    of Grippo, Lampariello and Lucidi), each backtrack to the minimum of the quadratic through
    ``f(x)``, the slope and the rejected value (safeguarded to 1/10..1/2 of the move: one or two
    where halving takes several). Stops when no coordinate moves by ``xtol``, when ``max_backtracks``
    backtracks (or those whose move could still gain ``ftol`` to first order) find no acceptable
    point, or after ``patience`` iterations without a new best lower by ``ftol`` (absolute: ``f`` is
    a log). The normal surrogate is piecewise smooth only (its CDF jumps where one client's demand
    reaches the band, docs/method.md): the monotone rule (``memory = 1``) stops sooner there, at as
    good a point. Returns the best point seen, so ``f(x) <= f(x0)``. One value-and-gradient site,
    and a trial is usually accepted: a small compile, one pass an iteration.
    """
    value_and_grad = jax.value_and_grad(f)
    project = lambda x: jnp.clip(x, lo, hi)

    def line_search(x, fx, g, step, f_ref):
        d = project(x - step * g) - x
        slope = jnp.vdot(g, d)

        def cond(c):  # give up once the move could gain no more than ftol (to first order)
            lam, _, fn, _, tries = c
            return (tries == 0) | ((tries <= max_backtracks) & (-lam * slope >= ftol)
                                   & ~(fn <= f_ref + 1e-4 * lam * slope))

        def body(c):
            lam, _, fn, _, tries = c
            # Backtrack to the minimum of the quadratic through f(x), its slope and f(x + lam d),
            # kept in [lam / 10, lam / 2] (halving where that value is not finite).
            curv = fn - fx - lam * slope
            quad = jnp.where(curv > 0, -slope * lam ** 2 / (2 * jnp.where(curv > 0, curv, 1.0)), 0.5 * lam)
            lam = jnp.where(tries == 0, 1.0, jnp.where(jnp.isfinite(fn), jnp.clip(quad, 0.1 * lam, 0.5 * lam),
                                                         0.5 * lam))
            xn = x + lam * d
            fn, gn = value_and_grad(xn)
            return lam, xn, fn, gn, tries + 1

        lam, xn, fn, gn, _ = jax.lax.while_loop(cond, body, (1.0, x, jnp.inf, g, 0))
        return xn, jnp.where(jnp.isfinite(fn), fn, jnp.inf), gn, fn <= f_ref + 1e-4 * lam * slope

    def cond(c):
        it, *_, done = c
        return (it < max_iters) & ~done

    def body(c):
        it, x, fx, g, step, hist, best_x, best_f, f_start, stall, _ = c
        xn, fn, gn, ok = line_search(x, fx, g, step, jnp.max(hist))  # iteration 0: g = 0, evaluates x0
        dx, dg = xn - x, gn - g
        curv = jnp.vdot(dx, dg)
        bb = jnp.where(curv > 0, jnp.vdot(dx, dx) / jnp.where(curv > 0, curv, 1.0), 2.0 * step)
        free = jnp.where(gn > 0, xn > lo, xn < hi)  # the coordinates a step along -g can move
        step = jnp.where(it == 0, 1.0 / jnp.maximum(jnp.max(jnp.where(free, jnp.abs(gn), 0.0)), 1e-30), bb)
        hist = jnp.where(it == 0, fn, jnp.roll(hist, 1).at[0].set(fn))
        better = fn < best_f - ftol
        stall = jnp.where(better, 0, stall + 1)
        done = (it > 0) & ((jnp.max(jnp.abs(dx)) < xtol) | ~ok | (stall >= patience))
        return (it + 1, xn, fn, gn, jnp.clip(step, 1e-10, 1e10), hist, jnp.where(fn < best_f, xn, best_x),
                jnp.minimum(fn, best_f), jnp.where(it == 0, fn, f_start), stall, done)

    x0 = project(x0)
    init = (0, x0, jnp.inf, jnp.zeros_like(x0), 1.0, jnp.full(memory, jnp.inf), x0, jnp.inf, jnp.inf, 0, False)
    *_, x, fx, f_start, _, _ = jax.lax.while_loop(cond, body, init)
    return x, fx, f_start


# ----------------------------------------------------------------------------- the solver

def _log_objective(problem: Problem, cfg: SolverConfig) -> Callable[[jax.Array], jax.Array]:
    def f(x):  # x = (log q, log rho), (2, N)
        return jnp.log(objective_terms(problem, jnp.exp(x[0]), jnp.exp(x[1]), cfg)["objective"])
    return f


def round_rho(rho: jax.Array, rank: int) -> jax.Array:
    """Nearest grid ratio ``k / r`` with ``1 <= k <= r`` (as int ``k``)."""
    return jnp.clip(jnp.round(rho * rank), 1, rank).astype(jnp.int32)


# The coordinate search's moves: of one client's log q by these steps, or of its rank k to k +- 1 and
# to k times these factors (rounded to the grid).
_Q_STEPS = (-1.0, -0.2, 0.2, 1.0)
_K_FACTORS = (float(np.exp(-1.5)), float(np.exp(-0.5)), float(np.exp(0.5)), float(np.exp(1.5)))


def coordinate_search(f: Callable[[jax.Array], jax.Array], x: jax.Array, lo: jax.Array, hi: jax.Array,
                      rank: int | jax.Array, rounds: int) -> tuple[jax.Array, jax.Array]:
    """Greedy pattern search on the grid from ``x = (log q, log(k / rank))``, (2, N): each round
    evaluates every move of one coordinate (``log q_n`` by ``_Q_STEPS`` within ``[lo, hi]``; ``k_n``
    to ``k_n +- 1`` and ``k_n`` times ``_K_FACTORS``, rounded, within the bounds) at once, vmapped,
    and takes the best if it lowers ``f``; stops after ``rounds`` rounds or when none does. Returns
    ``(x, f(x))``.

    Why values and not the gradient: the normal surrogate is only piecewise smooth (its quadrature
    nodes see a client's CDF step cross from one node to the next), so along a slow client's ``rho``
    ``J`` is a sawtooth whose teeth slope against its trend; a descent stops on a tooth, a move of
    one client across several teeth does not (docs/method.md, "Why a coordinate search").
    """
    chex.assert_rank(x, 2)
    n, dtype = x.shape[1], x.dtype
    q_steps, k_factors = jnp.asarray(_Q_STEPS, dtype), jnp.asarray(_K_FACTORS, dtype)
    row = jnp.concatenate([jnp.zeros(len(_Q_STEPS), int), jnp.ones(2 + len(_K_FACTORS), int)])
    # (client j, move m, row, client i): move m of client j changes x[row[m], j]
    changes = (row[None, :, None, None] == jnp.arange(2)[:, None]) & jnp.eye(n, dtype=bool)[:, None, None]

    def candidates(x):
        k = jnp.round(jnp.exp(x[1]) * rank)
        ks = jnp.concatenate([k[:, None] + jnp.asarray([-1.0, 1.0], dtype), jnp.round(k[:, None] * k_factors)], 1)
        new = jnp.concatenate([x[0][:, None] + q_steps, jnp.log(jnp.clip(ks, 1, rank) / rank)], 1)  # (N, moves)
        stacked = jnp.stack([lo, hi])[:, row, :].transpose(0, 2, 1)  # (2, N, moves): each move's row bounds
        new = jnp.clip(new, stacked[0], stacked[1])
        return jnp.where(changes, new[:, :, None, None], x).reshape(-1, 2, n)

    def cond(c):
        it, _, _, moved = c
        return (it < rounds) & moved

    def body(c):
        it, x, fx, _ = c
        cand = candidates(x)
        fs = jax.vmap(f)(cand)
        i = jnp.argmin(jnp.where(jnp.isnan(fs), jnp.inf, fs))
        moved = fs[i] < fx
        return it + 1, jnp.where(moved, cand[i], x), jnp.where(moved, fs[i], fx), moved

    _, x, fx, _ = jax.lax.while_loop(cond, body, (0, x, f(x), True))
    return x, fx


def _baselines(n: int, box: Box, dtype) -> dict[str, tuple[jax.Array, jax.Array]]:
    q = jnp.full(n, box.baseline_q, dtype)
    one = jnp.ones(n, dtype)
    return {"uniform": (q, one), "fixed_ratio": (q, jnp.full(n, box.fixed_ratio, dtype)), "full": (one, one)}


def _structured_starts(problem: Problem, box: Box) -> jax.Array:
    """Starts from the problem's structure, ``(8, 2, N)`` in ``(log q, log rho)``: everyone at
    ``q = 1`` or at ``q_min`` (which is which depends on the round cost), each with four sketch
    patterns: the slow clients sketched down to the floor of the fastest quarter (or half) of the
    clients at full rank (``rho_n = (tau - T_min_n(0)) / slope_n``, clipped), everyone at
    ``rho = 1/r`` (what power-limited clients in deep fades need), everyone at full rank."""
    floor0, floor1 = problem.clients.times(0.0).floor, problem.clients.times(1.0).floor
    ordered = jnp.sort(jnp.where(problem.valid, floor1, jnp.inf))
    count = problem.valid.sum()
    rho_min = 1.0 / box.rank

    def sketch_to(frac):
        tau = ordered[jnp.floor(frac * (count - 1)).astype(jnp.int32)]
        return jnp.clip((tau - floor0) / (floor1 - floor0), rho_min, 1.0)

    rhos = jnp.log(jnp.stack([sketch_to(0.25), sketch_to(0.5), jnp.full_like(floor0, rho_min),
                              jnp.ones_like(floor0)]))
    log_q = jnp.log(jnp.stack([1.0, box.q_min]).astype(rhos.dtype))
    return jnp.stack([jnp.stack([jnp.full_like(r, lq), r]) for lq in log_q for r in rhos])


def _solve_problem(problem: Problem, key: jax.Array, box: Box, cfg: SolverConfig) -> SolveResult:
    n, dtype = problem.num_clients, problem.a.dtype
    cfg = cfg.for_clients(n)
    f = _log_objective(problem, cfg)
    pinned = ~problem.valid  # padding: held at q = rho = 1 (its terms are masked out)
    lo = jnp.where(pinned, 0.0, jnp.log(jnp.stack([jnp.full(n, box.q_min, dtype), jnp.full(n, 1.0 / box.rank, dtype)])))
    hi = jnp.zeros((2, n), dtype)
    base = _baselines(n, box, dtype)
    base_x = jnp.stack([jnp.log(jnp.stack(qr)) for qr in base.values()])
    starts = jnp.concatenate([base_x, _structured_starts(problem, box)])
    large = n > cfg.multistart_max_clients
    if large:  # one descent, from the best start
        screened = jax.lax.map(f, starts)
        starts = starts[jnp.argmin(screened)][None]
    else:
        starts = jnp.concatenate([starts, lo + (hi - lo) * jax.random.uniform(key, (cfg.restarts, 2, n), dtype)])
    on_grid = lambda x: x.at[:, 1].set(jnp.log(round_rho(jnp.exp(x[:, 1]), box.rank) / box.rank))

    # The first `cfg.descents` phases descend in the box from every start, each from where the last
    # ended (a restart: the Barzilai-Borwein step and the stall count begin afresh); the last rounds
    # each rho to the grid and re-optimizes q alone (rho's bounds pinned). One loop, so the descent
    # is compiled once.
    def phase(i, carry):
        xs, _, f_starts = carry
        box_phase = i < cfg.descents
        xs = jnp.where(box_phase, xs, on_grid(xs))
        los = jnp.where(box_phase, lo, jnp.stack([jnp.broadcast_to(lo[0], xs[:, 0].shape), xs[:, 1]], 1))
        his = jnp.where(box_phase, hi, jnp.stack([jnp.broadcast_to(hi[0], xs[:, 0].shape), xs[:, 1]], 1))
        descend = lambda x0, l, h: minimize_box(f, x0, l, h, cfg.max_iters, cfg.xtol, ftol=cfg.ftol,
                                                patience=cfg.patience, max_backtracks=cfg.max_backtracks)
        if len(xs) == 1:  # a vmapped while loop selects its whole state every step: skip it
            xs, fs, f0 = jax.tree.map(lambda v: v[None], descend(xs[0], los[0], his[0]))
        else:
            xs, fs, f0 = jax.vmap(descend)(xs, los, his)
        return xs, fs, jnp.where(i == 0, f0, f_starts)  # phase 0's start values: the baselines' too

    zeros = jnp.zeros(len(starts), dtype)
    xs, fs, f_starts = jax.lax.fori_loop(0, cfg.descents + 1, phase, (starts, zeros, zeros))
    x, fx = xs[jnp.argmin(fs)], jnp.min(fs)
    if cfg.search_rounds:  # from the best polished start, on the grid
        x, fx = coordinate_search(f, x, lo, hi, box.rank, cfg.search_rounds)
    # The best plan, or a baseline (on the grid, its log J known from the screening or the first
    # evaluation of its descent) if one is better: never worse. E[T] = J / rounds.
    candidates = jnp.concatenate([x[None], base_x])
    log_j = jnp.concatenate([fx[None], (screened if large else f_starts)[:len(base)]])
    rounds = jax.vmap(lambda x: predicted_rounds(problem, jnp.exp(x[0]), jnp.exp(x[1])))(candidates)
    terms = {"objective": jnp.exp(log_j), "expected_round_time": jnp.exp(log_j) / rounds, "predicted_rounds": rounds}
    best = jnp.argmin(log_j)
    q, k = jnp.exp(candidates[best, 0]), round_rho(jnp.exp(candidates[best, 1]), box.rank)
    baselines = {name: jax.tree.map(lambda v: v[i + 1], terms) for i, name in enumerate(base)}
    return SolveResult(q=q, rho=(k / box.rank).astype(dtype), k=k, baselines=baselines,
                       **jax.tree.map(lambda v: v[best], terms))


_solve_jit = jax.jit(_solve_problem, static_argnames="cfg")


def _solve_scenarios(problems: Problem, keys: jax.Array, box: Box, cfg: SolverConfig) -> SolveResult:
    return jax.lax.map(lambda pk: _solve_problem(*pk, box, cfg), (problems, keys))


_solve_batch_jit = jax.jit(_solve_scenarios, static_argnames="cfg")


def _unpad(result: SolveResult, n: int) -> SolveResult:
    return result.replace(q=result.q[..., :n], rho=result.rho[..., :n], k=result.k[..., :n])


def solve_problem(problem: Problem, key: jax.Array, cfg: SolverConfig, *, min_clients: int = 0) -> SolveResult:
    """Solve one scenario. The clients are padded to :func:`bucket_size` (of at least
    ``min_clients``: one compilation can serve several sizes) first, so the jitted solver compiles
    once per bucket and numerics, not once per client count, bandwidth, rank or bound."""
    n = problem.num_clients
    padded = pad_problem(problem, bucket_size(max(n, min_clients)))
    return _unpad(_solve_jit(padded, key, cfg.box(), cfg.numerics()), n)


def solve_batch(problems: Problem, keys: jax.Array, cfg: SolverConfig, *, min_clients: int = 0) -> SolveResult:
    """Solve many scenarios in one call: ``problems`` and ``keys`` carry a leading scenario axis.

    The scenarios run one after another (``lax.map``), each exactly as :func:`solve_problem` would
    (same results, bit for bit), a little faster than separate calls. Not vmapped: under vmap the
    data-dependent while loops run every scenario until the slowest stops, carrying the whole batch
    each step (5.6x a single solve per scenario at 100 x 1000 clients); vmapped blocks of 4 still
    cost 1.2-2x (docs/method.md).
    """
    chex.assert_tree_shape_prefix((problems, keys), keys.shape[:1])
    n = problems.num_clients
    padded = pad_problem(problems, bucket_size(max(n, min_clients)))
    return _unpad(_solve_batch_jit(padded, keys, cfg.box(), cfg.numerics()), n)


def compile_count() -> int:
    """Compilations of the solver so far (single and batched): what padding keeps small."""
    return _solve_jit._cache_size() + _solve_batch_jit._cache_size()


def solve(profile: wireless.SystemProfile, sys: wireless.SystemConfig, workload: wireless.WorkloadModel,
          g2: jax.Array, a: jax.Array, alpha: float, beta: float, cfg: SolverConfig, *, overhead_s: float,
          min_round_s: float = 0.0) -> SolveResult:
    """Sampling probabilities and grid sketch ratios minimizing ``(alpha V + beta) E[T]``."""
    problem = make_problem(profile, sys, workload, g2, a, alpha, beta, overhead_s=overhead_s,
                           min_round_s=min_round_s)
    return solve_problem(problem, jax.random.key(cfg.seed), cfg)


# ----------------------------------------------------------------------------- closed-form references

def sampling_only_demand(problem: Problem, rho: jax.Array, cfg: SolverConfig, num_levels: int = 2000,
                         ) -> tuple[jax.Array, jax.Array]:
    """Best ``q`` at fixed ``rho`` under the expected-demand surrogate, by a 1-D search: ``(q, J)``.

    At a round-time level ``T`` (above every floor), the constraint is ``sum q_n b_n(T) <= Bw`` and
    ``V`` is separable, so KKT gives ``q_n = clip(sqrt(w_n / (mu b_n)), q_min, 1)`` with
    ``w_n = a_n^2 G_n^2 / rho_n`` and ``mu`` set by the budget (water-filling, bisection in
    ``log mu``); ``J(T) = (alpha V(q(T)) + beta) T`` is then scanned over ``num_levels`` levels.
    """
    times = problem.clients.times(rho)
    w = problem.a ** 2 * problem.g2 / rho
    bw = problem.bandwidth_hz
    t_lo = jnp.max(times.floor)
    t_hi = wireless.adaptive_round_time(times, jnp.ones_like(rho, bool), bw)  # q = 1 fits here

    def best_q(tau):
        b = wireless.bandwidth_for_slack(times, tau - times.floor)
        q_of = lambda log_mu: jnp.clip(jnp.sqrt(w / (jnp.exp(log_mu) * b)), cfg.q_min, 1.0)
        excess = lambda log_mu: jnp.log(jnp.sum(q_of(log_mu) * b)) - jnp.log(bw)
        log_mu = wireless.bisect_decreasing(excess, jnp.asarray(-200.0), jnp.asarray(200.0), 200)
        q = q_of(log_mu)
        feasible = jnp.sum(cfg.q_min * b) <= bw
        j = theory.predicted_rounds(q, rho, problem.g2, problem.a, problem.alpha, problem.beta) * tau
        return q, jnp.where(feasible, j, jnp.inf)

    taus = t_lo + (t_hi - t_lo) * jnp.geomspace(1e-6, 1.0, num_levels)
    qs, js = jax.lax.map(best_q, taus, batch_size=100)
    i = jnp.argmin(js)
    return qs[i], js[i]


def equal_times_rho(alpha: float, beta: float, g2: jax.Array, a: jax.Array, t0: float, t1: float,
                    rank: int) -> float:
    """Best common ``rho`` when every client is sampled (``q = 1``) and round time is ``t0 + t1 rho``.

    With ``A = alpha sum a^2 G^2``: ``J = (A / rho + beta - A)(t0 + t1 rho)`` has its stationary
    point at ``rho* = sqrt(A t0 / ((beta - A) t1))``, clipped to ``[1/r, 1]`` (``1`` if ``beta <= A``).
    """
    big_a = alpha * float(jnp.sum(a * a * g2))
    if beta <= big_a:
        return 1.0
    return float(np.clip(np.sqrt(big_a * t0 / ((beta - big_a) * t1)), 1.0 / rank, 1.0))
