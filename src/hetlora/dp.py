"""Client-level differential privacy for heterogeneous ranks (DP-FedAvg over LoRA factors).

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018): clip
each client's update, add Gaussian noise to the sum, divide by the fixed number of sampled
clients, and account for the privacy spent. Here, for clients of different ranks:

* **Clipping, on the device** (`clip_reply`): a client of rank r_k receives
  ``(B0, A0) = (G_B[:, :r_k], G_A[:r_k])`` and trains ``(B, A)``; its update
  ``D_k = (B - B0, A - A0)`` over every module and both factors (zero-padded to r_max this is the
  same vector: the padding adds zeros) is scaled to L2 norm at most C, and the reply is
  ``(B0, A0) + min(1, C / ||D_k||) D_k``. The server checks it again (`check_reply`).
* **Noise, on the server** (`NoisyUpdateSum`): with m the number of clients sampled in
  the round (fixed by ``clients_per_round``, not the number that replied),

      G_B' = G_B + (sum_k pad(D_k) + Z_B) / m       (likewise A)

  the average of the zero-padded clipped updates plus ``Z / m``. A missing or refused reply
  adds nothing (``D_k = 0``), so whether a reply arrives moves the release by at most its own
  clipped update, and a round is never skipped. ``Z`` has standard deviation ``sigma * C`` on
  every rank position where the global B column or A row is non-zero (`reachable`: a position
  zero in both gets no gradient and the mask depends on released state only). Unlike HetLoRA's
  ``(1/m) sum_k pad(B_k)``, positions above a client's rank get no pull towards zero from it
  and the noise covers every position, not only those below the round's largest rank: both
  would make the release depend on which ranks were sampled, and the accountant's
  amplification by sampling needs the sample hidden. So the global adapter keeps rank r_max
  under DP (no zero-padding collapse, no self-pruning).
* **The accountant** (`epsilon`): the run samples ``m`` of ``N`` clients uniformly without
  replacement each round; the released sum changes by at most ``2C`` when one client's data are
  replaced by another's (``||D_k - D_k'|| <= 2C``), so each round is
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(sigma / 2))`` (noise over the
  sensitivity) under the replace-one relation, composed over the rounds with ``dp-accounting``'s
  RDP accountant. (Under add/remove-one the sensitivity would be C and the same sigma would
  report a smaller epsilon; replace-one is the relation sampling without replacement needs.)

Everything else a client releases must be public: under DP the aggregation weights are uniform,
ranks are the seeded assignment (self-pruning, a data-dependent rank decision, is off), and
HetLoRA's sparsity weights (a function of ``||dW_k||``) are not used (`hetlora.config`'s
rules refuse the combinations that would leak). With a secret noise seed the client sample is
drawn from it too (`hetlora.runtime.rounds.round_clients`), so that nodes knowing the config's
``seed`` cannot compute it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from hetlora.errors import HetLoRAError
from hetlora.lora import Factors, truncate

#: The server refuses a reply whose update norm exceeds ``C * (1 + CLIP_SLACK)`` and scales one
#: between C and that back to C in float64: a client clips in float32, and the round-off of
#: ``B0 + s D`` in float32 can leave the norm of what arrives a little above C.
CLIP_SLACK = 1e-3


def default_delta(num_clients: int) -> float:
    """``dp_delta = 0`` means ``min(1e-5, 1 / (10 N))``: below 1/N for every N."""
    return min(1e-5, 1.0 / (10 * max(num_clients, 1)))


def _accountant_epsilon(
    num_clients: int, per_round: int, noise_multiplier: float, rounds: int, delta: float
) -> float:
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def epsilon(
    num_clients: int, per_round: int, noise_multiplier: float, rounds: int, delta: float
) -> float:
    """Epsilon spent after ``rounds`` rounds of ``per_round`` of ``num_clients`` clients sampled
    without replacement, noise ``noise_multiplier * C`` on a sum of updates clipped to C,
    replace-one relation (see the module docstring), at ``delta``. 0 after no rounds."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _accountant_epsilon(num_clients, per_round, noise_multiplier, rounds, delta)


def calibrate(
    target_epsilon: float, num_clients: int, per_round: int, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon after ``rounds`` rounds is at most
    ``target_epsilon``, as Opacus' ``make_private_with_epsilon`` does for its planned steps."""
    if not target_epsilon > 0:
        raise HetLoRAError(f"dp_target_epsilon must be > 0, got {target_epsilon}")

    def eps(sigma: float) -> float:
        return epsilon(num_clients, per_round, sigma, rounds, delta)

    low, high = 0.01, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise HetLoRAError(
                f"no noise multiplier reaches epsilon {target_epsilon:g} at delta {delta:g} "
                f"over {rounds} rounds"
            )
    while high / low > 1.001:  # bisection in log space; eps falls as sigma grows
        mid = math.sqrt(low * high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class DPPlan:
    """A run's differential privacy, fixed at its start (kept in the server's checkpoint).

    Attributes:
        clip_norm: C, the L2 bound of every client's update.
        noise_multiplier: sigma (given, or calibrated from ``target_epsilon``).
        delta: the delta epsilon is reported at.
        num_clients, per_round: N and m of the sampling.
        rounds: the planned rounds (what a target epsilon was calibrated for).
        target_epsilon: the target, 0 when sigma was given.
        noise_seed: seeds the server's noise (128 bits); a secret drawn at the start unless
            the config fixes one, joined with the run's seed (then anyone who knows both can
            subtract the noise: for studies only).
        secret: whether ``noise_seed`` is the secret; then it also draws the client sample,
            which the accountant's amplification by sampling needs hidden.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float
    num_clients: int
    per_round: int
    rounds: int
    target_epsilon: float = 0.0
    noise_seed: int = 0
    secret: bool = False

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds."""
        return epsilon(self.num_clients, self.per_round, self.noise_multiplier, rounds, self.delta)


def plan(cfg, num_clients: int) -> DPPlan | None:
    """The run's `DPPlan` from its config (None when ``dp_clip_norm`` is 0)."""
    if not cfg.dp_clip_norm > 0:
        return None
    per_round = min(cfg.clients_per_round, num_clients)
    delta = cfg.dp_delta or default_delta(num_clients)
    if not delta < 1 / num_clients:
        raise HetLoRAError(
            f"dp_delta {delta:g} must be below 1/N = {1 / num_clients:.3g} for N = {num_clients} "
            f"clients (a larger delta allows releasing one client's data outright)"
        )
    sigma = cfg.dp_noise_multiplier
    if cfg.dp_target_epsilon > 0:
        sigma = calibrate(cfg.dp_target_epsilon, num_clients, per_round, cfg.rounds, delta)
    return DPPlan(
        clip_norm=cfg.dp_clip_norm,
        noise_multiplier=sigma,
        delta=delta,
        num_clients=num_clients,
        per_round=per_round,
        rounds=cfg.rounds,
        target_epsilon=cfg.dp_target_epsilon,
        noise_seed=_noise_seed(cfg),
        secret=not cfg.dp_noise_seed,
    )


def _noise_seed(cfg) -> int:
    """128 bits: a secret (``dp_noise_seed = 0``), or the fixed seed joined with the run's
    ``seed``, so that the seeds of a study draw independent noise."""
    if not cfg.dp_noise_seed:
        return secrets.randbits(128)
    state = np.random.SeedSequence([cfg.dp_noise_seed, cfg.seed, 0xD9]).generate_state(2, np.uint64)
    return int(state[0]) << 64 | int(state[1])


def update_norm(received: Mapping[str, tuple], reply: Mapping[str, tuple]) -> float:
    """``||D||``: the L2 norm of ``reply - received`` over every module and both factors."""
    total = 0.0
    for name, (b0, a0) in received.items():
        b, a = reply[name]
        total += float((b.double() - b0.double()).pow(2).sum())
        total += float((a.double() - a0.double()).pow(2).sum())
    return math.sqrt(total)


def clip_reply(received: Factors, trained: Factors, clip_norm: float) -> Factors:
    """``received + min(1, C / ||D||) D`` with ``D = trained - received`` (both at one rank)."""
    norm = update_norm(received, trained)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out: Factors = {}
    for name, (b0, a0) in received.items():
        b, a = trained[name]
        if b.shape != b0.shape or a.shape != a0.shape:
            raise HetLoRAError(
                f"{name}: a DP reply must keep the received rank {b0.shape[1]} (got {b.shape[1]})"
            )
        out[name] = (
            (b0.float() + (b.float() - b0.float()) * scale).to(b.dtype),
            (a0.float() + (a.float() - a0.float()) * scale).to(a.dtype),
        )
    return out


def check_reply(global_factors: Factors, reply: Factors, rank: int, clip_norm: float) -> Factors:
    """The server's check of a DP reply at the client's ``rank``: refuse an update norm above
    ``C (1 + CLIP_SLACK)``; scale one above C (the float32 round-off of the client's own
    clipping) back to C in float64, so that the sum the noise covers has sensitivity 2C exactly.
    Returns the reply (float64 where it was scaled)."""
    received = truncate(global_factors, rank)
    norm = update_norm(received, reply)
    if norm > clip_norm * (1 + CLIP_SLACK):
        raise HetLoRAError(f"update norm {norm:.6g} exceeds dp_clip_norm {clip_norm:g}")
    if norm <= clip_norm:
        return reply
    scale = clip_norm / norm
    out: Factors = {}
    for name, (b0, a0) in received.items():
        b, a = reply[name]
        b0, a0 = b0.double(), a0.double()
        out[name] = (b0 + (b.double() - b0) * scale, a0 + (a.double() - a0) * scale)
    return out


def reachable(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Rank positions of one module's global factors that local training can move: column j of
    B or row j of A non-zero (boolean, length r). Where both are zero, ``dL/dB_j = g A_j^T`` and
    ``dL/dA_j = B_j^T g`` are zero, so no client's update reaches position j (AdamW moves no
    parameter whose gradients were all zero, and weight decay scales zero to zero)."""
    return (b != 0).any(dim=0) | (a != 0).any(dim=1)


class NoisyUpdateSum:
    """One round's DP aggregate (see the module docstring): the sum of the clients' clipped,
    zero-padded updates relative to the global factors, Gaussian noise on every reachable
    position, a fixed divisor.

    Args:
        global_factors: G, the factors the round started from (rank r_max).
        plan: clip norm, noise multiplier and the noise seed.
        noise_a: add noise to A too (False when A is frozen and never changes, as in FFA-LoRA).
    """

    def __init__(self, global_factors: Factors, plan: DPPlan, noise_a: bool = True) -> None:
        self.global_factors = global_factors
        self.plan = plan
        self.noise_a = noise_a
        self._sum = {
            n: (torch.zeros_like(b, dtype=torch.float64), torch.zeros_like(a, dtype=torch.float64))
            for n, (b, a) in global_factors.items()
        }
        self._live = {n: reachable(b, a).double() for n, (b, a) in global_factors.items()}

    def add(self, reply: Factors) -> None:
        """Fold in one checked reply at its rank r: its update ``reply - G[:r]``, zero-padded,
        kept on the reachable positions only (`reachable`: an honest client's update is
        exactly zero elsewhere, and what a reply put there would be released without noise)."""
        for name, (b, a) in reply.items():
            g_b, g_a = self.global_factors[name]
            r = b.shape[1]
            s_b, s_a = self._sum[name]
            live = self._live[name][:r]
            s_b[:, :r] += (b.double() - g_b[:, :r].double()) * live
            s_a[:r] += (a.double() - g_a[:r].double()) * live[:, None]

    def result(self, round_idx: int, divisor: int) -> Factors:
        """``G + (sum + Z) / divisor``, ``Z`` of std ``sigma * C`` on every reachable position
        (zero elsewhere, and on A when ``noise_a`` is False), drawn in module order from
        `noise_generator` for the round."""
        gen = noise_generator(self.plan.noise_seed, round_idx)
        std = self.plan.noise_multiplier * self.plan.clip_norm
        out: Factors = {}
        for name in sorted(self._sum):
            g_b, g_a = self.global_factors[name]
            s_b, s_a = self._sum[name]
            live = self._live[name]
            z_b = torch.from_numpy(gen.standard_normal(tuple(s_b.shape))) * std * live
            z_a = torch.from_numpy(gen.standard_normal(tuple(s_a.shape))) * std * live[:, None]
            if not self.noise_a:
                z_a.zero_()
            b = g_b.double() + (s_b + z_b) / divisor
            a = g_a.double() + (s_a + z_a) / divisor
            out[name] = (b.to(g_b.dtype), a.to(g_a.dtype))
        return out


def noise_generator(seed: int, round_idx: int, stream: int = 0) -> np.random.Generator:
    """The generator of one round's server-side randomness: PCG64DXSM (a 128-bit state) seeded
    from the plan's 128-bit seed and the round; ``stream`` 0 draws the noise, 1 the secret
    client sample (`hetlora.runtime.rounds.round_clients`). Not a cryptographically secure
    generator: see docs/privacy.md."""
    return np.random.Generator(
        np.random.PCG64DXSM(np.random.SeedSequence(seed, spawn_key=(round_idx, stream)))
    )
