"""Wall-clock model of heterogeneous wireless clients (docs/method.md, 'Time model').

A round's participant ``n`` computes for ``t_cmp_n`` seconds, then uploads ``s_n`` bits over
``b_n`` Hz of the system bandwidth at the Shannon rate ``R_n(b) = b log2(1 + c_n / b)``, where
``c_n = p_n h_n / N0`` (Hz) is the client's SNR-bandwidth product. The rate saturates at
``c_n / ln 2``, so each client has a floor ``T_min_n = t_cmp_n + s_n ln2 / c_n`` that no bandwidth
beats.

Every modelling choice is one named function a user can swap:

* :func:`path_gain` -- channel gain from distance and fading (3GPP-style path loss);
* :func:`compute_time` -- local work over compute speed (FLOPs from :class:`WorkloadModel`);
* :func:`payload_bits` -- the sketched adapter upload;
* :func:`upload_excess` / :func:`bandwidth_for_slack` -- the rate law and its inverse.

Numerics. Near the floor, the textbook inverse of the upload time loses all its digits. We write
the rate law with ``u = c / b`` (the SNR) and ``h(u) = 1 - log1p(u) / u`` (``h`` in (0, 1)): the
upload time is ``D_min / (1 - h(u))``, so the time above the floor is ``D_min h / (1 - h)`` and the
inverse solves ``logit h(u) = log(slack) - log(D_min)`` for ``log u`` by Newton's method. Both sides
are computed in well-conditioned forms, so ``slack = T - T_min`` (always passed directly, never
recovered from ``T``) keeps its relative accuracy in float32 and float64 alike.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedlora_jax.fields import require

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- configs and data

@dataclasses.dataclass(frozen=True)
class SystemConfig:
    """The cell and its clients' hardware (the model of docs/method.md, 'Time model').

    Attributes:
      bandwidth_hz: total uplink bandwidth ``Bw`` shared by a round's participants.
      noise_dbm_per_hz: noise power spectral density ``N0``.
      power_w: (low, high) of the uniform transmit-power range.
      cell_radius_m: clients are uniform in a disc of this radius around the base station ...
      min_distance_m: ... but no closer than this.
      rayleigh_fading: multiply the path gain by an Exp(1) fading power.
      flops_median: median compute speed (FLOP/s) of the log-normal speed law.
      flops_log_sigma: standard deviation of log compute speed.
      downlink_bps: broadcast rate of the base station (bit/s): the global adapter (FLoRA: the
        stacked adapters) reaches the round's clients at this rate before they train.
      server_flops_per_s: the server's speed for aggregation work beyond a weighted sum
        (FlexLoRA's SVDs).
    """

    bandwidth_hz: float = 10e6
    noise_dbm_per_hz: float = -174.0
    power_w: tuple[float, float] = (0.1, 0.2)
    cell_radius_m: float = 500.0
    min_distance_m: float = 10.0
    rayleigh_fading: bool = True
    flops_median: float = 1e12
    flops_log_sigma: float = 0.5
    downlink_bps: float = 100e6
    server_flops_per_s: float = 1e13

    def __post_init__(self):
        require(self.bandwidth_hz > 0, "bandwidth_hz", self.bandwidth_hz, "be > 0",
                "give the total bandwidth in Hz, e.g. 10e6 (10 MHz)")
        lo, hi = self.power_w
        require(0 < lo <= hi, "power_w", self.power_w, "be (low, high) watts with 0 < low <= high")
        require(0 < self.min_distance_m < self.cell_radius_m, "(min_distance_m, cell_radius_m)",
                (self.min_distance_m, self.cell_radius_m), "satisfy 0 < min_distance_m < cell_radius_m")
        require(self.flops_median > 0, "flops_median", self.flops_median, "be > 0 FLOP/s")
        require(self.flops_log_sigma >= 0, "flops_log_sigma", self.flops_log_sigma, "be >= 0")
        require(math.isfinite(self.noise_dbm_per_hz), "noise_dbm_per_hz", self.noise_dbm_per_hz,
                "be a finite dBm/Hz", "e.g. -174")
        require(self.downlink_bps > 0, "downlink_bps", self.downlink_bps, "be > 0",
                "give the broadcast rate in bit/s, e.g. 100e6")
        require(self.server_flops_per_s > 0, "server_flops_per_s", self.server_flops_per_s,
                "be > 0 FLOP/s", "e.g. 1e13")

    @property
    def noise_w_per_hz(self) -> float:
        return 10.0 ** ((self.noise_dbm_per_hz - 30.0) / 10.0)


@struct.dataclass
class SystemProfile:
    """Per-client system arrays, all (N,): compute speed (FLOP/s), transmit power (W), channel gain."""

    flops_per_s: jax.Array
    power_w: jax.Array
    gain: jax.Array

    @property
    def num_clients(self) -> int:
        return self.flops_per_s.shape[0]


@dataclasses.dataclass(frozen=True)
class WorkloadModel:
    """Per-client work of one round at full LoRA rank; sketched parts scale with ``rho = k / r``.

    Attributes:
      base_flops_per_step: frozen-base FLOPs of one local step (forward + activation backward).
      lora_flops_per_step_full_rank: LoRA FLOPs of one local step at rank ``r``.
      payload_bits_full_rank: bits of the full-rank adapter upload.
      local_steps: local steps ``H`` per round.
    """

    base_flops_per_step: float
    lora_flops_per_step_full_rank: float
    payload_bits_full_rank: float
    local_steps: int = 1

    def __post_init__(self):
        for name in ("base_flops_per_step", "lora_flops_per_step_full_rank", "payload_bits_full_rank"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "be a count >= 0")
        require(self.payload_bits_full_rank > 0, "payload_bits_full_rank", self.payload_bits_full_rank,
                "be > 0 (the bits of the adapter upload)")
        require(self.local_steps >= 1, "local_steps", self.local_steps, "be at least 1")


def workload_from_counts(base_params: float, lora_params_full_rank: float, tokens_per_step: float,
                         local_steps: int, bits: int = 32) -> WorkloadModel:
    """Workload from parameter counts with the ``2 * params`` FLOPs-per-token forward rule.

    The frozen base runs forward and back-propagates activations only (~``4 P`` per token); the LoRA
    part also forms weight gradients (~``6 P_lora`` per token), and scales with ``rho``.
    """
    return WorkloadModel(base_flops_per_step=4.0 * base_params * tokens_per_step,
                         lora_flops_per_step_full_rank=6.0 * lora_params_full_rank * tokens_per_step,
                         payload_bits_full_rank=float(bits) * lora_params_full_rank,
                         local_steps=local_steps)


@struct.dataclass
class ClientTimes:
    """What the time model needs per client, (N,) each, at given sketch ratios.

    ``compute``: t_cmp (s); ``bits``: upload size; ``snr_bw``: ``c = p h / N0`` (Hz).
    """

    compute: jax.Array
    bits: jax.Array
    snr_bw: jax.Array

    @property
    def upload_floor(self) -> jax.Array:
        """``D_min = s ln2 / c``: the upload time with unlimited bandwidth."""
        return self.bits * LN2 / self.snr_bw

    @property
    def floor(self) -> jax.Array:
        """``T_min = t_cmp + D_min``: no bandwidth finishes the client earlier."""
        return self.compute + self.upload_floor


# ----------------------------------------------------------------------------- validation

def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def validate_profile(profile: SystemProfile) -> None:
    """Raise ValueError naming the field if any per-client value is non-finite or non-positive."""
    if not _is_concrete(profile):
        return
    n = profile.num_clients
    for name in ("flops_per_s", "power_w", "gain"):
        x = np.asarray(getattr(profile, name))
        require(x.shape == (n,), f"SystemProfile.{name}.shape", x.shape, f"be ({n},), one value per client")
        bad = ~np.isfinite(x)
        require(~bad, f"SystemProfile.{name}", f"NaN/inf at clients {np.flatnonzero(bad)[:5].tolist()}",
                "be finite at every client", "fill in or drop the missing clients")
        require(x > 0, f"SystemProfile.{name}", f"non-positive at clients {np.flatnonzero(x <= 0)[:5].tolist()}",
                "be > 0 at every client")


def _validate_rho(rho) -> None:
    if _is_concrete(rho):
        r = np.asarray(rho)
        require(np.isfinite(r) & (r > 0) & (r <= 1), "rho", f"range [{r.min()}, {r.max()}]",
                "lie in (0, 1] (a sketch ratio k / r)")


# ----------------------------------------------------------------------------- profiles

def path_gain(distance_m: jax.Array, fading: jax.Array) -> jax.Array:
    """Channel power gain: path loss ``128.1 + 37.6 log10(d_km)`` dB times the fading power."""
    loss_db = 128.1 + 37.6 * jnp.log10(distance_m / 1000.0)
    return 10.0 ** (-loss_db / 10.0) * fading


def generate_profile(key: jax.Array, num_clients: int, cfg: SystemConfig) -> SystemProfile:
    """Random clients: log-normal speeds, uniform powers, uniform positions in the cell, Rayleigh."""
    k_speed, k_power, k_dist, k_fade = jax.random.split(key, 4)
    speed = cfg.flops_median * jnp.exp(cfg.flops_log_sigma * jax.random.normal(k_speed, (num_clients,)))
    power = jax.random.uniform(k_power, (num_clients,), minval=cfg.power_w[0], maxval=cfg.power_w[1])
    # Uniform in the annulus: the radius has density proportional to d.
    u = jax.random.uniform(k_dist, (num_clients,))
    dist = jnp.sqrt(cfg.min_distance_m ** 2 + u * (cfg.cell_radius_m ** 2 - cfg.min_distance_m ** 2))
    fading = jax.random.exponential(k_fade, (num_clients,)) if cfg.rayleigh_fading else jnp.ones(num_clients)
    return SystemProfile(flops_per_s=speed, power_w=power, gain=path_gain(dist, fading))


_TRACE_ALIASES = {"flops_per_s": ("flops_per_s", "compute_speed"),
                  "rate_bps": ("rate_bps", "bandwidth_bps"),
                  "rate_kbps": ("rate_kbps", "bandwidth_kbps", "communication")}


def _read_columns(path: Path) -> dict[str, np.ndarray]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"trace file {path} is not UTF-8 text (byte {e.start}): save it as "
                         "UTF-8") from None
    if not text.strip():
        raise ValueError(f"trace file {path} is empty: give one row per client with a "
                         "flops_per_s column")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"trace file {path}, line {e.lineno}, column {e.colno}: invalid "
                             f"JSON ({e.msg}); fix the syntax there") from None
        if isinstance(data, list):  # a list of per-client records
            data = {k: [row.get(k, float("nan")) for row in data] for k in data[0]} if data else {}
        elif isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            rows = list(data.values())  # FedScale-style {client_id: {...}}
            data = {k: [row.get(k, float("nan")) for row in rows] for k in rows[0]} if rows else {}
        first_row = 1  # rows count from 1 (the first client)
    elif path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        data = {k: [row[k] if row[k] not in ("", None) else "nan" for row in rows] for k in rows[0]} if rows else {}
        first_row = 2  # a row's line in the file: line 1 is the header
    else:
        raise ValueError(f"trace file {path} has suffix {path.suffix!r}: use .csv or .json")
    if not data:
        raise ValueError(f"trace file {path} holds no clients: give one row per client with a "
                         "flops_per_s column")
    return {k: _numbers(v, path, k, first_row) for k, v in data.items() if k is not None}


def _numbers(values: list, path: Path, column: str, first_row: int) -> np.ndarray:
    """One trace column as floats; a cell that is no number is named by column and row."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        row, value = next((i, v) for i, v in enumerate(values) if not _is_number(v))
        where = "line" if first_row == 2 else "client"
        raise ValueError(f"trace file {path}, column {column!r}, {where} {row + first_row}: "
                         f"{value!r} is not a number; fix that cell") from None


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def load_trace(path: str | Path, num_clients: int | None = None, *, noise_dbm_per_hz: float = -174.0,
               reference_bandwidth_hz: float = 1e6, power_w: float = 0.2) -> SystemProfile:
    """Load measured per-client traces (CSV or JSON: records, columns, or ``{client: record}``).

    Columns: ``flops_per_s`` (or ``compute_speed``) and either ``power_w`` + ``gain``, or a measured
    link rate ``rate_bps`` / ``rate_kbps`` (FedScale's ``communication`` is kbps). A measured rate
    ``R`` is taken to hold over ``reference_bandwidth_hz`` ``b0``, and converted to the gain that gives
    it at ``power_w``: ``h = N0 b0 (2^(R/b0) - 1) / p``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    cols = _read_columns(path)

    def column(name: str) -> np.ndarray | None:
        return next((cols[a] for a in _TRACE_ALIASES.get(name, (name,)) if a in cols), None)

    speed = column("flops_per_s")
    require(speed is not None, f"the columns of {path.name}", sorted(cols),
            "include flops_per_s (or compute_speed)")
    n = len(speed)
    if num_clients is not None:
        require(n == num_clients, "num_clients", num_clients, f"match the {n} clients of the trace {path.name}",
                f"pass num_clients={n} or a trace with {num_clients}")
    for name, x in cols.items():
        bad = np.flatnonzero(~np.isfinite(x))
        require(bad.size == 0, f"trace column {name}", f"NaN at rows {bad[:5].tolist()}",
                "hold a number in every row", "fill in or drop those clients")
    if "power_w" in cols and "gain" in cols:
        power, gain = cols["power_w"], cols["gain"]
    else:
        rate = column("rate_bps")
        if rate is None and (kbps := column("rate_kbps")) is not None:
            rate = 1e3 * kbps
        require(rate is not None, f"the columns of {path.name}", sorted(cols),
                "include power_w and gain, or a measured link rate (rate_bps / rate_kbps)")
        require(rate > 0, "rate_bps", f"min {rate.min()}", "be > 0 at every client (a measured link rate)")
        noise = 10.0 ** ((noise_dbm_per_hz - 30.0) / 10.0)
        b0 = reference_bandwidth_hz
        power = np.full(n, power_w)
        gain = noise * b0 * np.expm1(rate / b0 * LN2) / power_w
    profile = SystemProfile(flops_per_s=jnp.asarray(speed, jnp.float32), power_w=jnp.asarray(power, jnp.float32),
                            gain=jnp.asarray(gain, jnp.float32))
    validate_profile(SystemProfile(flops_per_s=speed, power_w=power, gain=gain))
    return profile


# ----------------------------------------------------------------------------- per-client times

def compute_time(flops_per_s: jax.Array, workload: WorkloadModel, rho: jax.Array) -> jax.Array:
    """Local training time: ``H (F_base + rho F_lora) / f`` (only the kept rank part is trained)."""
    flops = workload.local_steps * (workload.base_flops_per_step + rho * workload.lora_flops_per_step_full_rank)
    return flops / flops_per_s


def payload_bits(workload: WorkloadModel, rho: jax.Array) -> jax.Array:
    """Upload size: the kept ``rho`` share of the adapter (the sketch seed is negligible)."""
    return rho * workload.payload_bits_full_rank


@struct.dataclass
class ClientArrays:
    """The low-level, per-client form of the time model, (N,) each, for a user's own network data.

    Compute seconds ``compute_s + rho * compute_per_rho_s`` and upload bits
    ``bits + rho * bits_per_rho`` are affine in the sketch ratio (the sketched LoRA part scales
    with ``rho``, the rest does not); ``snr_bw`` is ``c = p h / N0`` in Hz (the SNR per Hz of
    band). :func:`client_arrays` builds them from a profile; any dtype (float64 under x64).
    """

    compute_s: jax.Array
    compute_per_rho_s: jax.Array
    bits: jax.Array
    bits_per_rho: jax.Array
    snr_bw: jax.Array

    def times(self, rho: jax.Array) -> ClientTimes:
        """:class:`ClientTimes` at sketch ratios ``rho`` (N,)."""
        return ClientTimes(compute=self.compute_s + rho * self.compute_per_rho_s,
                           bits=self.bits + rho * self.bits_per_rho, snr_bw=self.snr_bw)


def validate_client_arrays(clients: ClientArrays) -> None:
    """Raise ValueError naming the field if a value is missing, negative, or the shapes differ."""
    if not _is_concrete(clients):
        return
    n = np.shape(clients.snr_bw)[0] if np.ndim(clients.snr_bw) == 1 else None
    require(n is not None, "ClientArrays.snr_bw.shape", np.shape(clients.snr_bw), "be (N,), one value per client")
    for field in dataclasses.fields(clients):
        x = np.asarray(getattr(clients, field.name))
        require(x.shape == (n,), f"ClientArrays.{field.name}.shape", x.shape, f"be ({n},), one value per client")
        require(np.isfinite(x) & (x >= 0), f"ClientArrays.{field.name}",
                f"NaN/inf/negative at clients {np.flatnonzero(~(np.isfinite(x) & (x >= 0)))[:5].tolist()}",
                "be finite and >= 0 at every client")
    require(np.asarray(clients.snr_bw) > 0, "ClientArrays.snr_bw", "zero at some clients",
            "be > 0 at every client (p h / N0)")
    require(np.asarray(clients.bits + clients.bits_per_rho) > 0, "ClientArrays.bits + bits_per_rho",
            "zero at some clients", "be > 0 at every client (the bits uploaded at rho = 1)")


def client_arrays(profile: SystemProfile, sys: SystemConfig, workload: WorkloadModel) -> ClientArrays:
    """The profile API in array form: ``H F_base / f`` and ``H F_lora / f`` seconds, the sketched
    adapter's bits, and ``p h / N0`` (:func:`compute_time`, :func:`payload_bits`)."""
    f = profile.flops_per_s
    compute_s = compute_time(f, workload, jnp.zeros_like(f))
    bits = payload_bits(workload, jnp.zeros_like(f))
    return ClientArrays(compute_s=compute_s, compute_per_rho_s=compute_time(f, workload, jnp.ones_like(f)) - compute_s,
                        bits=bits, bits_per_rho=payload_bits(workload, jnp.ones_like(f)) - bits,
                        snr_bw=(profile.power_w * profile.gain / sys.noise_w_per_hz).astype(f.dtype))


def client_times(profile: SystemProfile, sys: SystemConfig, workload: WorkloadModel,
                 rho: jax.Array) -> ClientTimes:
    """Per-client compute time, upload bits and SNR-bandwidth at sketch ratios ``rho`` (N,)."""
    rho = jnp.broadcast_to(rho, profile.flops_per_s.shape).astype(profile.flops_per_s.dtype)
    return client_arrays(profile, sys, workload).times(rho)


# The rate law in the SNR u = c / b. h(u) = 1 - log1p(u)/u; upload time = D_min / (1 - h).
_SERIES_BELOW = 0.01  # below, h(u)/u = sum_k (-u)^k / (k + 2), 8 terms: error < 1e-16 relative


def _h_over_u_series(u, xp=jnp):
    acc = xp.zeros_like(u)
    for k in reversed(range(8)):
        acc = acc * (-u) + 1.0 / (k + 2)
    return acc


def _log_h_terms(w, xp=jnp):
    """``(log h, log(1 - h))`` at ``u = exp(w)``, both without cancellation (``xp``: jnp or np)."""
    u = xp.exp(w)
    small = u < _SERIES_BELOW
    us, ul, wl = xp.where(small, u, 0.0), xp.where(small, 1.0, u), xp.where(small, 0.0, w)
    poly = _h_over_u_series(us, xp)
    ratio = xp.log1p(ul) / ul  # = 1 - h for large u
    log_h = xp.where(small, w + xp.log(poly), xp.log1p(-ratio))
    log_1mh = xp.where(small, xp.log1p(-us * poly), xp.log(xp.log1p(ul)) - wl)
    return log_h, log_1mh


def _logit_h(w, xp=jnp):
    log_h, log_1mh = _log_h_terms(w, xp)
    return log_h - log_1mh


# The inverse w(t) of logit h(e^w) = t is one smooth universal curve: tabulated once (float64
# Newton) on a uniform t-grid with its slope, read back by cubic Hermite interpolation (error
# < 1e-9); outside, its asymptotes: w = t + log 2 below, the fixed point of w = t + log w above.
_TABLE_T = (-30.0, 60.0, 1.0 / 16.0)  # first, last, spacing


def _inverse_table() -> tuple[np.ndarray, np.ndarray]:
    """``(w, dw/dt)`` on the grid ``_TABLE_T``, in float64 numpy (at import, a few ms)."""
    t0, t1, dt = _TABLE_T
    t = np.arange(t0, t1 + dt / 2, dt)
    w = t + np.log(2.0 + np.maximum(t, 0.0))  # the two asymptotes: h ~ u/2; logit h ~ w - log w
    for _ in range(40):
        u = np.exp(w)
        log_h, log_1mh = _log_h_terms(w, np)
        h = np.exp(log_h)
        ratio = np.log1p(u) / u
        # d logit h / dw = (1 - u / ((1 + u) log1p u)) / h, with the series' limit (1) for small u.
        dphi = np.where(u < 1e-6, 1.0 - u / 6.0, (1.0 - 1.0 / ((1.0 + u) * ratio)) / h)
        w = w - (log_h - log_1mh - t) / dphi
    return w, 1.0 / dphi


def _hermite_coefficients() -> np.ndarray:
    """Per table interval, the cubic ``c0 + c1 x + c2 x^2 + c3 x^3`` in ``x`` in [0, 1], (M, 4)."""
    w, dw = _inverse_table()
    d = dw * _TABLE_T[2]
    w0, w1, d0, d1 = w[:-1], w[1:], d[:-1], d[1:]
    return np.stack([w0, d0, 3 * (w1 - w0) - 2 * d0 - d1, 2 * (w0 - w1) + d0 + d1], axis=1)


_TABLE_COEF = _hermite_coefficients()


def _log_snr_table(t: jax.Array) -> jax.Array:
    """``w(t)`` by cubic Hermite interpolation in the table, asymptotes outside."""
    t0, t1, dt = _TABLE_T
    coef = jnp.asarray(_TABLE_COEF, t.dtype)
    s = (jnp.clip(t, t0, t1) - t0) / dt
    i = jnp.clip(jnp.floor(s).astype(jnp.int32), 0, coef.shape[0] - 1)
    x = s - i
    c0, c1, c2, c3 = (coef[:, k].at[i].get(mode="promise_in_bounds") for k in range(4))
    inside = c0 + x * (c1 + x * (c2 + x * c3))
    below = coef[0, 0] + (jnp.minimum(t, t0) - t0)  # slope 1 to < 1e-13 there
    t_up = jnp.maximum(t, t1)
    slope_up = (coef[-1, 1] + 2 * coef[-1, 2] + 3 * coef[-1, 3]) / dt
    above = t_up + jnp.log(t_up + jnp.log(coef[-1].sum() + slope_up * (t_up - t1)))  # 2 steps of w = t + log w
    return jnp.where(t < t0, below, jnp.where(t > t1, above, inside))


def _log_snr_from_logit(t: jax.Array, newton_steps: int = 1) -> jax.Array:
    """Solve ``logit h(exp(w)) = t`` for ``w``: the table, then Newton steps (1: float64 round-off).

    Differentiable: the table's slope is ``dw/dt`` to < 1e-7, and the Newton steps refine it.
    """
    w = _log_snr_table(t)
    for _ in range(newton_steps):  # 0 or 1 in practice: nothing to loop over
        f, df = jax.jvp(_logit_h, (w,), (jnp.ones_like(w),))
        w = w - (f - t) / df
    return w


def upload_excess(times: ClientTimes, bandwidth: jax.Array) -> jax.Array:
    """Upload time above the floor, ``s / R(b) - D_min``, at bandwidth ``b > 0`` (exact form)."""
    log_h, log_1mh = _log_h_terms(jnp.log(times.snr_bw) - jnp.log(bandwidth))
    return times.upload_floor * jnp.exp(log_h - log_1mh)


def upload_time(times: ClientTimes, bandwidth: jax.Array) -> jax.Array:
    """Shannon upload time ``s / (b log2(1 + c/b))``."""
    return times.upload_floor + upload_excess(times, bandwidth)


def bandwidth_for_slack(times: ClientTimes, slack: jax.Array, newton_steps: int = 1) -> jax.Array:
    """Bandwidth with which the client finishes ``slack = T - T_min > 0`` seconds above its floor.

    The inverse of :func:`upload_excess`; ``+inf`` where ``slack <= 0``. ``newton_steps = 0`` reads
    the table only (relative error < 1e-8: enough in float32, and about twice as fast).
    """
    positive = slack > 0
    safe = jnp.where(positive, slack, 1.0)
    w = _log_snr_from_logit(jnp.log(safe) - jnp.log(times.upload_floor), newton_steps)
    return jnp.where(positive, times.snr_bw * jnp.exp(-w), jnp.inf)


# ----------------------------------------------------------------------------- bandwidth allocation

def bisect_decreasing(fn: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array,
                      iters: int) -> jax.Array:
    """Root of a decreasing scalar ``fn`` on ``[lo, hi]`` (``fn(lo) >= 0 >= fn(hi)``)."""
    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = fn(mid) > 0
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)


def regula_falsi_decreasing(fn: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array,
                            iters: int) -> jax.Array:
    """Root of a decreasing scalar ``fn`` on ``[lo, hi]`` by Illinois regula falsi: the same
    contract as :func:`bisect_decreasing`, superlinear on smooth ``fn`` (10 steps where bisection
    needs 30)."""
    f_lo, f_hi = jax.vmap(fn)(jnp.stack([lo, hi]))  # one copy of fn for both ends
    lo, hi, f_lo, f_hi = _illinois(fn, lo, hi, f_lo, f_hi, iters)
    x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
    return jnp.where((x >= lo) & (x <= hi), x, 0.5 * (lo + hi))  # a flat fn (one client): the middle


def _implicit_root(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Attach implicit-function-theorem gradients to a root ``x`` of ``fn`` found without them.

    One Newton step with a stopped derivative: the value is (at least) as accurate as ``x``, and
    ``dx/dtheta = -(dfn/dtheta) / (dfn/dx)`` for whatever ``fn`` closes over.
    """
    x = jax.lax.stop_gradient(x)
    f, df = jax.jvp(fn, (x,), (jnp.ones_like(x),))
    step = f / jax.lax.stop_gradient(df)
    return x - jnp.where(jnp.isfinite(step), step, 0.0)


def _bottleneck(times: ClientTimes, mask: jax.Array) -> jax.Array:
    return jnp.argmax(jnp.where(mask, times.floor, -jnp.inf))


def adaptive_round_time(times: ClientTimes, mask: jax.Array, bandwidth_hz: float | jax.Array,
                        iters: int = 60, root: Callable = bisect_decreasing) -> jax.Array:
    """Minimal round time of the participants ``mask``: all finish together, ``sum b_n = Bw``.

    ``root`` (bisection, or :func:`regula_falsi_decreasing` with fewer ``iters``) on
    ``log(T - max T_min)`` between the slack at which the bottleneck client alone needs
    the whole band and the equal-split time; each client's slack is ``delta + (max T_min - T_min_n)``,
    so no digit is lost near the floor. Differentiable (implicit function theorem). 0 if empty.
    """
    any_ = mask.any()
    star = _bottleneck(times, mask)
    top = jnp.where(any_, times.floor[star], 0.0)
    gap = jnp.where(mask, top - times.floor, 0.0)
    count = jnp.maximum(mask.sum(), 1)
    bw = jnp.asarray(bandwidth_hz, times.compute.dtype)
    star_times = jax.tree.map(lambda x: x[star], times)
    lo = jnp.log(upload_excess(star_times, bw))
    hi = jnp.log(jnp.max(jnp.where(mask, upload_excess(times, bw / count) - gap, -jnp.inf)))
    hi = jnp.where(any_, jnp.maximum(hi, lo), lo)

    def excess_demand(log_delta):
        demand = jnp.where(mask, bandwidth_for_slack(times, jnp.exp(log_delta) + gap), 0.0).sum()
        return jnp.log(demand) - jnp.log(bw)

    log_delta = _implicit_root(excess_demand, root(excess_demand, lo, hi, iters))
    return jnp.where(any_, top + jnp.exp(log_delta), 0.0)


def allocate_bandwidth(times: ClientTimes, mask: jax.Array, bandwidth_hz: float | jax.Array,
                       iters: int = 60) -> tuple[jax.Array, jax.Array]:
    """``(T, b)``: the adaptive round time and each client's bandwidth (0 off the mask)."""
    t = adaptive_round_time(times, mask, bandwidth_hz, iters)
    slack = t - times.floor
    b = jnp.where(mask, bandwidth_for_slack(times, slack), 0.0)
    return t, b * (bandwidth_hz / jnp.maximum(b.sum(), jnp.finfo(b.dtype).tiny))  # exact budget


def equal_round_time(times: ClientTimes, mask: jax.Array, bandwidth_hz: float | jax.Array) -> jax.Array:
    """Round time with the band split equally among the participants (the baseline). 0 if empty."""
    share = bandwidth_hz / jnp.maximum(mask.sum(), 1)
    return jnp.max(jnp.where(mask, times.compute + upload_time(times, share), 0.0))


def round_time(profile: SystemProfile, sys: SystemConfig, workload: WorkloadModel, participants_mask: jax.Array,
               rho: jax.Array, adaptive: bool = True) -> dict[str, jax.Array]:
    """Wall-clock time of one round with these participants: ``total`` and the bottleneck's parts.

    ``compute`` and ``upload`` are those of the client that limits the round (largest floor with
    adaptive allocation, where everyone finishes together; latest finisher with the equal split).
    Jittable with ``adaptive`` static; an empty mask gives zeros.
    """
    chex.assert_shape(participants_mask, (profile.num_clients,))
    _validate_rho(rho)
    times = client_times(profile, sys, workload, rho)
    mask = participants_mask.astype(bool)
    if adaptive:
        total = adaptive_round_time(times, mask, sys.bandwidth_hz)
        star = _bottleneck(times, mask)
    else:
        total = equal_round_time(times, mask, sys.bandwidth_hz)
        share = sys.bandwidth_hz / jnp.maximum(mask.sum(), 1)
        star = jnp.argmax(jnp.where(mask, times.compute + upload_time(times, share), -jnp.inf))
    compute = jnp.where(mask.any(), times.compute[star], 0.0)
    return {"total": total, "compute": compute, "upload": total - compute}


def server_phases(sys: SystemConfig, download_bits: jax.Array, server_flops: float | jax.Array
                  ) -> dict[str, jax.Array]:
    """Seconds of a round's server-side phases: the broadcast before local training
    (``download_bits / downlink_bps``) and the aggregation work (``server_flops / speed``)."""
    return {"download": download_bits / sys.downlink_bps,
            "server": jnp.asarray(server_flops, jnp.float32) / sys.server_flops_per_s}


def round_cost(clients_s: jax.Array, overhead_s: float | jax.Array, min_round_s: float | jax.Array = 0.0
               ) -> jax.Array:
    """Seconds one round costs: ``overhead_s + max(T, min_round_s)``, empty rounds included.

    ``clients_s`` is the clients' phase ``T`` (compute and upload, 0 when nobody takes part);
    ``overhead_s`` the server's side (the broadcast of the global adapter, the aggregation step).
    Clients sample themselves independently, so the server learns that a round was empty only when
    it ends: the broadcast has gone out and the round has held its slot. The one rule of the run's
    clock (:func:`fedlora_jax.build.make_clock`) and of the solver's objective.
    """
    return overhead_s + jnp.maximum(clients_s, min_round_s)


# ----------------------------------------------------------------------------- expected round time

def sample_masks(key: jax.Array, q: jax.Array, num_draws: int) -> jax.Array:
    """Independent Bernoulli(q_n) participation masks, (num_draws, N)."""
    return jax.random.uniform(key, (num_draws,) + q.shape) < q


def expected_round_time_mc(key: jax.Array, times: ClientTimes, q: jax.Array, bandwidth_hz: float,
                           num_draws: int = 1000, adaptive: bool = True) -> tuple[jax.Array, jax.Array]:
    """Monte Carlo ``(mean, standard error)`` of the round time under independent sampling."""
    masks = sample_masks(key, q, num_draws)
    one = (lambda m: adaptive_round_time(times, m, bandwidth_hz)) if adaptive else (
        lambda m: equal_round_time(times, m, bandwidth_hz))
    t = jax.lax.map(one, masks, batch_size=min(num_draws, 256))  # vmapped in batches: bounded memory
    return t.mean(), t.std() / jnp.sqrt(num_draws)


def expected_max_exact(t: jax.Array, q: jax.Array) -> jax.Array:
    """Exact ``E[max_{n in P} t_n]`` (0 for the empty set) when times do not depend on the set.

    ``P(max <= tau) = prod_n (1 - q_n 1[t_n > tau])``: in decreasing order of ``t``, client ``i`` is
    the maximum with probability ``q_i prod_{j before i} (1 - q_j)``.
    """
    order = jnp.argsort(-t)
    t, q = t[order], q[order]
    survive = jnp.cumprod(jnp.concatenate([jnp.ones(1, q.dtype), 1.0 - q[:-1]]))
    return jnp.sum(t * q * survive)


def expected_round_time_exact(times: ClientTimes, q: jax.Array, bandwidth_hz: float | jax.Array,
                              adaptive: bool = True, batch_size: int = 1024) -> jax.Array:
    """Exact ``E[T]`` by enumerating all ``2^N`` participant sets (``N <= 16``; for tests).

    ``E[T] = sum_P T(P) prod_{n in P} q_n prod_{n not in P} (1 - q_n)``: multilinear in ``q``, so
    ``dE[T]/dq_n = E[T | n in] - E[T | n out]`` exactly, at the bounds too.
    """
    n = q.shape[0]
    require(n <= 16, "num_clients", n, "be at most 16 to enumerate every participant set",
            "use expected_round_time_mc above")
    masks = (jnp.arange(2 ** n)[:, None] >> jnp.arange(n)) & 1 == 1
    one = (lambda m: adaptive_round_time(times, m, bandwidth_hz)) if adaptive else (
        lambda m: equal_round_time(times, m, bandwidth_hz))
    t = jax.lax.map(one, masks, batch_size=min(batch_size, 2 ** n))
    prob = jnp.prod(jnp.where(masks, q, 1.0 - q), axis=1)
    return jnp.sum(prob * t)


def expected_round_time_demand(times: ClientTimes, q: jax.Array, bandwidth_hz: float,
                               iters: int = 60) -> jax.Array:
    """The naive surrogate: ``T`` with expected demand ``sum_n q_n b_n(T) = Bw``.

    Flawed (docs/method.md, 'Expected round time'): never below the largest floor however small
    that client's ``q``.
    Kept as the reference the closed form of :mod:`fedlora_jax.solver` is derived for.
    """
    # A client with bits and SNR-bandwidth both scaled by q has the same floor and needs q b_n(T).
    # Clients with q = 0 never take part (the solver's padding).
    on = q > 0
    q = jnp.where(on, q, 1.0)
    scaled = ClientTimes(compute=times.compute, bits=times.bits * q, snr_bw=times.snr_bw * q)
    return adaptive_round_time(scaled, on, bandwidth_hz, iters)


EXACT_DEMANDS = 2  # the slowest clients the normal surrogate sums exactly (a 2^K mixture of normals)


@struct.dataclass
class _CdfParts:
    """``P(T <= tau) ~ prod(1 - must_absent) sum_s weight_s Phi(z_s)`` at one ``tau``.

    ``must_absent``: ``q_n`` for each other client whose demand alone overflows the band (0 for
    the rest), (N,); ``weight``, ``z``: the ``2^K`` presence patterns of the ``K`` exactly summed
    clients (their probabilities, and the standardized slack the others leave in the band).
    """

    must_absent: jax.Array
    weight: jax.Array
    z: jax.Array


def _exact_clients(times: ClientTimes, q: jax.Array, exact_demands: int) -> jax.Array:
    """Indices of the ``exact_demands`` clients with the largest floors among those with ``q > 0``:
    the slowest, whose presence moves the round time most. Fixed over ``tau``, so the mixture
    never swaps clients as ``tau`` moves."""
    k = min(exact_demands, q.shape[0])
    return jax.lax.top_k(jnp.where(q > 0, jax.lax.stop_gradient(times.floor), -jnp.inf), k)[1]


def _demand(times: ClientTimes, bandwidth_hz, tau: jax.Array, newton_steps: int) -> jax.Array:
    """Each client's share of the band to finish by ``tau``; ``+inf`` at or below its floor."""
    slack = tau - times.floor
    b = bandwidth_for_slack(times, jnp.where(slack > 0, slack, 1.0), newton_steps)
    return jnp.where(slack > 0, b / bandwidth_hz, jnp.inf)


def _cdf_parts(times: ClientTimes, q: jax.Array, bandwidth_hz: float, tau: jax.Array,
               newton_steps: int, exact: jax.Array) -> _CdfParts:
    is_exact = jnp.zeros(q.shape, bool).at[exact].set(True)
    demand = _demand(times, bandwidth_hz, tau, newton_steps)
    feasible = demand <= 1.0  # a client that alone overflows the band must be absent: exact
    b = jnp.where(feasible & ~is_exact, demand, 0.0)
    must_absent = jnp.where(feasible | is_exact, 0.0, q)
    mean = jnp.sum(q * b)
    sd = jnp.sqrt(jnp.sum(q * (1.0 - q) * b * b) + 1e-12)
    top_b, top_q = demand[exact], q[exact]  # the exact clients' demands, from the same pass
    present = (jnp.arange(2 ** exact.shape[0])[:, None] >> jnp.arange(exact.shape[0])) & 1 == 1
    weight = jnp.prod(jnp.where(present, top_q, 1.0 - top_q), axis=1)
    taken = jnp.sum(jnp.where(present, top_b, 0.0), axis=1)
    fits = jnp.isfinite(taken)  # else a present client is at or below its floor: F = 0 (safe where)
    z = jnp.where(fits, (1.0 - mean - jnp.where(fits, taken, 0.0)) / sd, -jnp.inf)
    return _CdfParts(must_absent=must_absent, weight=weight, z=z)


def round_time_cdf_normal(times: ClientTimes, q: jax.Array, bandwidth_hz: float, tau: jax.Array,
                          newton_steps: int = 1, exact_demands: int = EXACT_DEMANDS,
                          exact: jax.Array | None = None) -> jax.Array:
    """Normal approximation of ``P(T <= tau)`` under independent sampling
    (docs/method.md, 'Expected round time').

    ``T(P) <= tau`` iff ``sum_{n in P} b_n(tau) <= Bw``. The ``exact_demands`` slowest clients
    (``exact``: their indices, default :func:`_exact_clients`) are summed exactly (a mixture over
    their presence); of the others, those whose floor is at or above ``tau`` or whose demand alone
    exceeds ``Bw`` must be absent (an exact product), the rest are summed as a normal law with mean
    ``sum q b`` and variance ``sum q (1 - q) b^2``. Both exact parts are multilinear in their ``q``,
    so the derivative in ``q_n`` stays finite and right at ``q_n = 1`` for them (where a normal law
    has no variance left to move); the product is taken directly, not as ``exp(sum log1p(-q))``,
    whose derivative is ``0 * inf`` at ``q = 1``.
    """
    exact = _exact_clients(times, q, exact_demands) if exact is None else exact
    parts = _cdf_parts(times, q, bandwidth_hz, tau, newton_steps, exact)
    mixture = jnp.sum(parts.weight * jax.scipy.special.ndtr(parts.z))
    return jnp.prod(1.0 - parts.must_absent) * mixture


def _cdf_log_odds(times: ClientTimes, q: jax.Array, bandwidth_hz: float, tau: jax.Array,
                  exact: jax.Array) -> jax.Array:
    """``log(F / (1 - F))`` of :func:`round_time_cdf_normal`, both tails without cancellation
    (``log_ndtr`` and log-sum-exp; +-inf where ``F`` is 0 or 1, which the caller clips). Values only."""
    parts = _cdf_parts(times, q, bandwidth_hz, tau, 0, exact)
    log_absent = jnp.sum(jnp.log1p(-parts.must_absent))  # -inf when a client with q = 1 must be absent
    log_weight = jnp.log(parts.weight)
    log_f = log_absent + jax.nn.logsumexp(log_weight + jax.scipy.special.log_ndtr(parts.z))
    log_1mf = jnp.logaddexp(jnp.log(-jnp.expm1(log_absent)),
                            log_absent + jax.nn.logsumexp(log_weight + jax.scipy.special.log_ndtr(-parts.z)))
    return log_f - log_1mf


def _illinois(fn: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array, f_lo: jax.Array,
              f_hi: jax.Array, iters: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Bracket ``[lo, hi]`` of the root of a decreasing ``fn`` (``f_lo >= 0 >= f_hi``) after
    ``iters`` steps of regula falsi with the Illinois rule (superlinear on smooth ``fn``), and the
    (Illinois-scaled) values at its ends."""
    def body(_, c):
        lo, hi, f_lo, f_hi, last = c
        x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        x = jnp.where((x > lo) & (x < hi), x, 0.5 * (lo + hi))
        fx = fn(x)
        right = fx > 0  # the root lies right of x
        f_lo, f_hi = (jnp.where(~right & (last == -1), 0.5 * f_lo, f_lo),
                      jnp.where(right & (last == 1), 0.5 * f_hi, f_hi))  # the Illinois halving
        return (jnp.where(right, x, lo), jnp.where(right, hi, x), jnp.where(right, fx, f_lo),
                jnp.where(right, f_hi, fx), jnp.where(right, 1, -1))
    lo, hi, f_lo, f_hi, _ = jax.lax.fori_loop(0, iters, body, (lo, hi, f_lo, f_hi, 0))
    return lo, hi, f_lo, f_hi


_SUPPORT_Q_MAX = 0.99  # see _support
_SPLIT_ITERS = 10  # regula falsi steps of the split point (+ one implicit Newton step)
_LOG_ODDS_CLIP = 30.0  # beyond float32's reach; keeps regula falsi's secants finite


def _support(times: ClientTimes, q: jax.Array, bandwidth_hz: float, tail: float, iters: int,
             exact: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A range ``[a, b]`` of ``tau`` where ``F`` rises from ``p0 + tail`` to ``1 - tail`` (``p0``:
    the probability of the empty round) (regula falsi in the log-odds of ``F`` over ``log(tau - lo)``).

    Exact facts bound it: below the smallest floor ``lo`` only the empty round has finished, and
    every round has by the equal-split time of all clients that can take part (``q > 0``). The
    outer ends of the two brackets are returned, so the range errs on the wide side. No gradient:
    the integrand is flat outside.
    """
    # q is capped below 1 so that the range also holds the rounds a client at q = 1 would shorten
    # by leaving: where the one-sided derivative in its q lives.
    times, q = jax.lax.stop_gradient((times, jnp.minimum(q, _SUPPORT_Q_MAX)))
    p0 = jnp.prod(1.0 - q)
    lo = jnp.min(jnp.where(q > 0, times.floor, jnp.inf))
    width = equal_round_time(times, q > 0, bandwidth_hz) - lo
    odds = lambda s: jnp.clip(_cdf_log_odds(times, q, bandwidth_hz, lo + jnp.exp(s), exact),
                              -_LOG_ODDS_CLIP, _LOG_ODDS_CLIP)
    s_lo, s_hi = jnp.log(width) + jnp.log(jnp.finfo(width.dtype).eps), jnp.log(width)
    o_lo, o_hi = jax.vmap(odds)(jnp.stack([s_lo, s_hi]))  # one copy of the CDF for both ends
    levels = jnp.stack([p0 + tail, 1.0 - tail])
    target = jnp.log(levels) - jnp.log1p(-levels)

    def bracket(t):
        return _illinois(lambda s: t - odds(s), s_lo, s_hi, t - o_lo, t - o_hi, iters)[:2]
    los, his = jax.vmap(bracket)(target)
    return lo + jnp.exp(los[0]), lo + jnp.exp(his[1])


def _gauss_legendre(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(num_points)
    return 0.5 * (x + 1.0), 0.5 * w


def _split_point(times: ClientTimes, q: jax.Array, bandwidth_hz: float | jax.Array, exact: jax.Array) -> jax.Array:
    """Where the normal law's step is: the round time of the exactly summed clients all present and
    each other client ``n`` at its mean demand ``q_n b_n`` (a client with bits and SNR-bandwidth
    both scaled by ``q`` needs ``q b``). ``T(all)`` at ``q = 1``, and its implicit gradient in a
    ``q_n`` is the mean shift ``b_n / (d demand / d tau)``: the one-sided derivative there, where
    the normal law has no spread left and the quadrature alone would give 0."""
    on = q > 0
    scale = jnp.where(on & ~jnp.zeros(q.shape, bool).at[exact].set(True), q, 1.0)
    scaled = ClientTimes(compute=times.compute, bits=times.bits * scale, snr_bw=times.snr_bw * scale)
    return adaptive_round_time(scaled, on, bandwidth_hz, _SPLIT_ITERS, regula_falsi_decreasing)


def expected_round_time_normal(times: ClientTimes, q: jax.Array, bandwidth_hz: float | jax.Array,
                               num_points: int = 24, tail: float = 1e-4, iters: int = 12,
                               min_round_s: float | jax.Array = 0.0,
                               exact_demands: int = EXACT_DEMANDS) -> jax.Array:
    """``E[max(T, m)] = m + int_m^inf (1 - P(T <= tau)) dtau`` with the CDF ``F`` of
    :func:`round_time_cdf_normal` (``m = min_round_s``: no round, empty ones included, is shorter).

    Below the range ``[a, b]`` from :func:`_support` (``iters`` regula falsi steps) ``F`` is the
    probability ``p0`` of the empty round. The integral is split at ``c``, the normal law's step
    (:func:`_split_point`), into two pieces of one length ``L = max(c - a, b - c)``, each by
    Gauss-Legendre on ``num_points`` nodes (the inverse rate law read from its table):
    ``int_a^inf (1 - F) = (1 - p0)(c - a) - int_{c-L}^c (F - p0) + int_c^{c+L} (1 - F)``, ``F``
    read at ``max(tau, a)`` below ``a`` (one more node corrects for it). The nodes mirror each other
    about ``c``, so a step of ``F`` at ``c`` narrower than their spacing (the normal law's spread
    ``~ sqrt(1 - q)`` as ``q -> 1``) adds the same on both sides and cancels: the value moves with
    ``c`` alone, and ``c``'s implicit gradient is the exact one-sided derivative at ``q = 1``.
    Clients with ``q = 0`` never take part (the padding of :mod:`fedlora_jax.solver`); if nobody
    can, every round is empty and lasts ``m``.
    """
    anyone = jnp.any(q > 0)
    q = jnp.where(anyone, q, 1.0)  # safe where: the value below is then finite, and unused
    exact = _exact_clients(times, q, exact_demands)
    a, b = _support(times, q, bandwidth_hz, tail, iters, exact)
    m = jnp.asarray(min_round_s, a.dtype)
    lo, hi = jnp.maximum(a, m), jnp.maximum(b, m)
    c = jnp.clip(_split_point(times, q, bandwidth_hz, exact), lo, hi)
    length = jnp.maximum(c - lo, hi - c)
    p0 = jnp.prod(1.0 - q)
    x, w = (jnp.asarray(v, a.dtype) for v in _gauss_legendre(num_points))
    # -int_{c-L}^c (F(max(tau, lo)) - p0) + int_c^{c+L} (1 - F) + (F(lo) - p0)(lo - c + L): each node
    # adds weight * (target - F(tau)).
    nodes = jnp.concatenate([jnp.maximum(c - length * x, lo), c + length * x, lo[None]])
    weights = jnp.concatenate([length * w, length * w, (c - length - lo)[None]])
    targets = jnp.concatenate([jnp.full(num_points, p0), jnp.ones(num_points, a.dtype), p0[None]])

    @jax.checkpoint  # one node at a time, recomputed in the backward pass: (N,) arrays stay in cache
    def add_node(acc, node):
        tau, weight, target = node
        cdf = round_time_cdf_normal(times, q, bandwidth_hz, tau, 0, exact=exact)
        return acc + weight * (target - cdf), None

    integral, _ = jax.lax.scan(add_node, jnp.zeros((), a.dtype), (nodes, weights, targets))
    return jnp.where(anyone, m + (1.0 - p0) * (c - m) + integral, m)
