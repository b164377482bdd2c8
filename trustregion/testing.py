"""The conformance harness: the checks every trust-region strategy must pass.

Run it on your own strategy::

    from trustregion.testing import check_strategy
    report = check_strategy(MyStrategy(width=0.1))   # raises AssertionError on the first failure

or one check per test with pytest::

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS)
    def test_my_strategy(check):
        run_check(check, MyStrategy())

The checks, all by autograd in float64 unless said:

* ``gradient_weight`` — ∂J/∂log π ÷ (Â·r) equals the weight the strategy declares, on a grid of
  (ν, π, Â) and on a random multi-token batch.
* ``regions`` — just inside, at and just beyond the boundary the strategy declares (Â > 0 and
  Â < 0): declared weight = autograd weight, ``outside`` is False inside and True beyond, the
  weight beyond is below the weight inside, and moving the same distance toward ν never counts
  as outside.
* ``masking`` — masked tokens (even holding NaN) get exactly zero loss and zero gradient and do
  not change any other token's loss.
* ``micro_batch`` — for every aggregation mode, micro-batches with global counts sum to the full
  batch's loss and gradient.
* ``bf16`` — bf16 inputs give the float32 result on the same values and a bf16 gradient.
* ``on_policy`` — at π = ν the gradient is the plain policy gradient (w = 1).
* ``limit`` — with every width scaled by 1e6 the weight equals the strategy's
  :meth:`~trustregion.strategies.TrustRegionStrategy.limit_weight` (w = 1, PG-IS, by default).
* ``empty_mask`` — an all-zero mask gives zero loss, zero gradient, finite metrics.
* ``metrics`` — every shared metric key is present, scalar, finite; fractions lie in [0, 1]
  and agree with the per-token outputs.
* ``no_host_sync`` — after the first batch, a call never reads a tensor back to the host
  (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``int()``, ``.numpy()``).
* ``hparams`` — ``type(s)(**s.hparams())`` rebuilds an identical strategy (what the CLI does), and
  ``state_dict`` round-trips.

Models get the same treatment: :func:`check_model` (from :mod:`trustregion.model_check`) runs a
model source through rollout, update and checkpoint and checks that the behaviour log-probs
equal the policy's recomputed ones, that padding and EOS are handled, that every trainable
parameter gets a gradient and that a checkpoint restores identical log-probs::

    from trustregion.testing import check_model
    report = check_model("config:path/to/dir")   # raises AssertionError naming the failed check

:func:`check_model`, :class:`ModelCheckReport` and :data:`MODEL_CHECKS` are imported from
:mod:`trustregion.model_check` on first use, so that the strategy checks need neither Lightning
nor transformers.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trustregion.functional.aggregation import AGGREGATION_MODES, aggregate, step_counts
from trustregion.strategies.base import METRIC_PREFIX, SHARED_METRICS, TrustRegionStrategy
from trustregion.strategies.batch import TokenBatch

if TYPE_CHECKING:
    from trustregion.model_check import MODEL_CHECKS, ModelCheckReport, check_model

__all__ = [
    "CONFORMANCE_CHECKS",
    "MODEL_CHECKS",
    "ConformanceReport",
    "ModelCheckReport",
    "autograd_weight",
    "check_model",
    "check_strategy",
    "forbid_host_sync",
    "probe_batch",
    "run_check",
]

F64 = torch.float64

_FROM_MODEL_CHECK = ("MODEL_CHECKS", "ModelCheckReport", "check_model")


def __getattr__(name: str) -> Any:
    """The model check's names, imported when first asked for (they load Lightning)."""
    if name in _FROM_MODEL_CHECK:
        from trustregion import model_check

        return getattr(model_check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SkipCheck(Exception):
    """A check that does not apply to this strategy (e.g. no closed-form boundary)."""


@dataclass
class ConformanceReport:
    """Which checks passed and which were skipped (with the reason)."""

    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _topk_columns(logp: Tensor, behavior_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Top-K data for probes: the sampled token, one other token holding 40% of the remaining
    mass, and one unused slot (−inf)."""

    def columns(lp: Tensor) -> Tensor:
        other = torch.log(0.4 * -torch.expm1(lp.detach().clamp(max=-1e-9)))
        unused = torch.full_like(other, -math.inf)
        return torch.stack([lp.detach(), other, unused], dim=-1)

    return columns(logp), columns(behavior_logp)


def probe_batch(
    behavior_prob: Tensor,
    prob: Tensor,
    advantages: Tensor,
    *,
    old_shift: float = 0.0,
    mask: Tensor | None = None,
    dtype: torch.dtype = F64,
) -> TokenBatch:
    """A batch of one-token sequences (shape ``[N, 1]``) with the given ν, π and Â.

    ``old_logp`` is the behaviour log-prob plus ``old_shift``; top-K data is always included.
    """
    behavior_logp = behavior_prob.to(dtype).log()[:, None]
    logp = prob.to(dtype).log()[:, None].clone().requires_grad_(True)
    topk_logp, topk_behavior_logp = _topk_columns(logp, behavior_logp)
    return TokenBatch(
        logp=logp,
        behavior_logp=behavior_logp,
        advantages=advantages.to(dtype),
        mask=torch.ones_like(behavior_logp, dtype=torch.bool) if mask is None else mask,
        old_logp=behavior_logp + old_shift,
        topk_logp=topk_logp,
        topk_behavior_logp=topk_behavior_logp,
    )


def _random_batch(seed: int, batch: int = 6, time: int = 5, dtype: torch.dtype = F64,
                  spread: float = 0.4) -> TokenBatch:
    gen = torch.Generator().manual_seed(seed)
    behavior_prob = torch.rand(batch, time, generator=gen, dtype=F64) * 0.9 + 0.05
    behavior_logp = behavior_prob.log()
    shift = (torch.rand(batch, time, generator=gen, dtype=F64) * 2 - 1) * spread
    logp = (behavior_logp + shift).clamp(max=-1e-4)
    lengths = torch.tensor([time, time - 1, 2, time, 1, 3][:batch] + [time] * max(0, batch - 6))
    mask = torch.arange(time)[None, :] < lengths[:, None]
    adv = torch.randn(batch, generator=gen, dtype=F64)
    logp_leaf = logp.to(dtype).detach().requires_grad_(True)
    topk_logp, topk_behavior_logp = _topk_columns(logp_leaf, behavior_logp.to(dtype))
    return TokenBatch(
        logp=logp_leaf,
        behavior_logp=behavior_logp.to(dtype),
        advantages=adv.to(dtype),
        mask=mask,
        old_logp=(behavior_logp + 0.05).clamp(max=-1e-4).to(dtype),
        topk_logp=topk_logp,
        topk_behavior_logp=topk_behavior_logp,
    )


def _anchor_logp(strategy: TrustRegionStrategy, batch: TokenBatch) -> Tensor:
    anchor = batch.old_logp if strategy.anchor == "old" else batch.behavior_logp
    assert anchor is not None
    return anchor.detach()


def autograd_weight(strategy: TrustRegionStrategy, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """(autograd weight, declared weight) per token. The autograd weight is
    −∂(Σ loss)/∂log π ÷ (Â·r); it is NaN where Â = 0 or the token is masked."""
    logp = batch.logp
    if logp.grad is not None:
        logp.grad = None
    out = strategy(batch)
    out.token_loss.sum().backward()
    assert logp.grad is not None, "the strategy's loss does not depend on TokenBatch.logp"
    ratio = (logp.detach().to(F64) - _anchor_logp(strategy, batch).to(F64)).exp()
    adv = batch.token_advantages().to(F64)
    valid = batch.bool_mask() & (adv != 0)
    auto = torch.where(valid, -logp.grad.to(F64) / (adv * ratio),
                       torch.full_like(ratio, math.nan))
    return auto, out.weight.to(F64)


def _assert_close(actual: Tensor, expected: Tensor, what: str, *, atol: float = 1e-6,
                  rtol: float = 1e-6) -> None:
    ok = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} mismatch(es); first at {bad}: "
            f"got {actual[~ok][:5].tolist()}, expected {expected[~ok][:5].tolist()}"
        )


def _grid() -> tuple[Tensor, Tensor, Tensor]:
    nus = torch.tensor([1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    factors = torch.tensor([0.05, 0.5, 0.8, 0.95, 1.0, 1.05, 1.2, 1.5, 3.0, 30.0], dtype=F64)
    advs = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=F64)
    nu, f, adv = torch.meshgrid(nus, factors, advs, indexing="ij")
    pi = (nu * f).clamp(max=0.999)
    return nu.reshape(-1), pi.reshape(-1), adv.reshape(-1)


def check_gradient_weight(strategy: TrustRegionStrategy) -> None:
    nu, pi, adv = _grid()
    auto, declared = autograd_weight(strategy, probe_batch(nu, pi, adv, old_shift=0.02))
    _assert_close(auto[:, 0], declared[:, 0], "grid: autograd weight vs declared weight")
    batch = _random_batch(seed=0)
    auto, declared = autograd_weight(strategy, batch)
    valid = ~auto.isnan()
    _assert_close(auto[valid], declared[valid], "random batch: autograd vs declared weight")


def check_regions(strategy: TrustRegionStrategy) -> None:
    nu = torch.tensor([0.05, 0.3, 0.5, 0.7], dtype=F64).repeat(2)
    adv = torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=F64)
    anchor_shift = 0.02 if strategy.anchor == "old" else 0.0
    anchor_logp = nu.log() + anchor_shift
    boundary = strategy.boundary_logp(anchor_logp, adv)
    if boundary is None:
        raise SkipCheck(f"{type(strategy).__name__} declares no closed-form boundary")
    usable = boundary.isfinite() & (boundary < -1e-3)
    if not bool(usable.any()):
        raise SkipCheck("no probe has a boundary inside (0, 1) at these widths")
    nu, adv, anchor_logp, boundary = nu[usable], adv[usable], anchor_logp[usable], boundary[usable]
    direction = torch.sign(boundary - anchor_logp)
    assert bool((direction == adv.sign()).all()), (
        "boundary_logp must lie in the harmful direction: above ν for Â > 0, below for Â < 0"
    )
    gap = 0.25 * (boundary - anchor_logp).abs()
    points = {"inside": boundary - direction * gap, "at": boundary,
              "beyond": boundary + direction * gap, "toward": anchor_logp - direction * gap}
    results = {}
    for name, logp in points.items():
        logp = logp.clamp(max=-1e-9)
        batch = probe_batch(anchor_logp.exp() / math.exp(anchor_shift), logp.exp(), adv,
                            old_shift=anchor_shift)
        auto, declared = autograd_weight(strategy, batch)
        _assert_close(auto[:, 0], declared[:, 0], f"{name} the boundary: autograd vs declared")
        results[name] = (declared[:, 0], strategy(batch).outside[:, 0])
    assert not bool(results["inside"][1].any()), "tokens inside the boundary counted as outside"
    assert bool(results["beyond"][1].all()), "tokens beyond the boundary not counted as outside"
    assert not bool(results["toward"][1].any()), "tokens moving toward ν counted as outside"
    assert bool((results["beyond"][0] < results["inside"][0]).all()), (
        "the gradient weight beyond the boundary must be smaller than inside it"
    )


def check_masking(strategy: TrustRegionStrategy) -> None:
    batch = _random_batch(seed=1)
    strategy(batch)  # the finiteness check runs on a strategy's first batch only
    mask = batch.bool_mask()
    garbage = batch.logp.detach().clone()
    garbage[~mask] = math.nan
    poisoned = copy.copy(batch)
    poisoned.logp = garbage.requires_grad_(True)
    poisoned.behavior_logp = torch.where(mask, batch.behavior_logp,
                                         torch.full_like(batch.behavior_logp, math.inf))
    clean_loss = strategy(batch).token_loss
    out = strategy(poisoned)
    assert bool((out.token_loss[~mask] == 0).all()), "masked tokens must have exactly zero loss"
    _assert_close(out.token_loss[mask], clean_loss[mask],
                  "values at masked positions changed the loss of unmasked tokens", atol=0)
    out.token_loss.sum().backward()
    grad = poisoned.logp.grad
    assert grad is not None
    assert bool((grad[~mask] == 0).all()), "masked tokens must get exactly zero gradient"
    assert bool(grad[mask].isfinite().all()), "NaN at masked positions leaked into the gradient"


def check_micro_batch(strategy: TrustRegionStrategy) -> None:
    horizon = 7
    splits = [(0, 2), (2, 3), (3, 6)]
    for mode in AGGREGATION_MODES:
        full = _random_batch(seed=2)
        full_loss = aggregate(strategy(full).token_loss, full.mask, mode, horizon=horizon)
        full_loss.backward()
        assert full.logp.grad is not None
        counts = step_counts([full.mask[a:b] for a, b in splits])
        total = torch.zeros((), dtype=F64)
        grads = []
        for a, b in splits:
            part = _random_batch(seed=2)
            part = TokenBatch(
                logp=part.logp.detach()[a:b].requires_grad_(True),
                behavior_logp=part.behavior_logp[a:b], advantages=part.advantages[a:b],
                mask=part.mask[a:b], old_logp=None if part.old_logp is None
                else part.old_logp[a:b],
                topk_logp=None if part.topk_logp is None else part.topk_logp[a:b],
                topk_behavior_logp=None if part.topk_behavior_logp is None
                else part.topk_behavior_logp[a:b],
            )
            loss = aggregate(strategy(part).token_loss, part.mask, mode, counts=counts,
                             horizon=horizon)
            loss.backward()
            total = total + loss.detach()
            assert part.logp.grad is not None
            grads.append(part.logp.grad)
        _assert_close(total, full_loss.detach(), f"{mode}: sum of micro-batch losses",
                      atol=1e-12, rtol=1e-9)
        _assert_close(torch.cat(grads), full.logp.grad, f"{mode}: micro-batch gradients",
                      atol=1e-12, rtol=1e-9)


def check_bf16(strategy: TrustRegionStrategy) -> None:
    low = _random_batch(seed=3, dtype=torch.bfloat16)
    wide = _random_batch(seed=3, dtype=torch.bfloat16)
    wide = TokenBatch(
        logp=wide.logp.detach().float().requires_grad_(True),
        behavior_logp=wide.behavior_logp.float(), advantages=wide.advantages.float(),
        mask=wide.mask, old_logp=None if wide.old_logp is None else wide.old_logp.float(),
        topk_logp=None if wide.topk_logp is None else wide.topk_logp.float(),
        topk_behavior_logp=None if wide.topk_behavior_logp is None
        else wide.topk_behavior_logp.float(),
    )
    out_low, out_wide = strategy(low), strategy(wide)
    assert out_low.token_loss.dtype == torch.float32, (
        f"bf16 inputs must give a float32 loss; got {out_low.token_loss.dtype}"
    )
    _assert_close(out_low.token_loss, out_wide.token_loss, "bf16 vs float32 on the same values")
    out_low.token_loss.sum().backward()
    out_wide.token_loss.sum().backward()
    assert low.logp.grad is not None and wide.logp.grad is not None
    assert low.logp.grad.dtype == torch.bfloat16, "the gradient must flow back in bf16"
    _assert_close(low.logp.grad.float(), wide.logp.grad.to(torch.bfloat16).float(),
                  "bf16 gradient", atol=1e-6, rtol=1e-2)


def check_on_policy(strategy: TrustRegionStrategy) -> None:
    nu, _, adv = _grid()
    batch = probe_batch(nu.clamp(max=0.9), nu.clamp(max=0.9), adv)
    auto, _ = autograd_weight(strategy, batch)
    _assert_close(auto[:, 0], torch.ones_like(auto[:, 0]), "π = ν must give w = 1")


def check_limit(strategy: TrustRegionStrategy) -> None:
    if not strategy.widths:
        raise SkipCheck(f"{type(strategy).__name__} has no width hyperparameters")
    loose = copy.deepcopy(strategy)
    loose.scale_width(1e6)
    nu, pi, adv = _grid()
    moderate = (pi / nu > 0.25) & (pi / nu < 4)
    batch = probe_batch(nu[moderate], pi[moderate], adv[moderate], old_shift=0.02)
    auto, _ = autograd_weight(loose, batch)
    expected = loose.limit_weight(loose.prepare(batch)).to(F64)
    _assert_close(auto[:, 0], expected[:, 0], "widths × 1e6: weight vs limit_weight",
                  atol=1e-4, rtol=1e-4)


def check_empty_mask(strategy: TrustRegionStrategy) -> None:
    batch = _random_batch(seed=4)
    batch.mask = torch.zeros_like(batch.mask)
    out = strategy(batch)
    assert bool((out.token_loss == 0).all()), "an all-zero mask must give zero loss"
    for mode in AGGREGATION_MODES:
        loss = aggregate(out.token_loss, batch.mask, mode, horizon=5)
        assert float(loss.detach()) == 0.0, f"{mode}: an all-zero mask must aggregate to exactly 0"
    out.token_loss.sum().backward()
    assert batch.logp.grad is not None and bool((batch.logp.grad == 0).all())
    for name, value in out.metrics.items():
        assert bool(value.isfinite()), f"metric {name} is {float(value)} for an all-zero mask"


def check_metrics(strategy: TrustRegionStrategy) -> None:
    batch = _random_batch(seed=5, spread=1.0)
    out = strategy(batch)
    mask = batch.bool_mask()
    for key in SHARED_METRICS:
        assert METRIC_PREFIX + key in out.metrics, f"missing shared metric {METRIC_PREFIX + key}"
    for name, value in out.metrics.items():
        assert name.startswith(METRIC_PREFIX), f"metric {name} lacks the {METRIC_PREFIX} prefix"
        assert value.dim() == 0 and bool(value.isfinite()), f"metric {name} = {value}"
        assert not value.requires_grad, f"metric {name} must be detached"
        if name.endswith("_frac") or "_frac_" in name:
            assert 0.0 <= float(value) <= 1.0, f"fraction {name} = {float(value)}"
    m = out.metrics
    n = mask.sum()
    _assert_close(m[METRIC_PREFIX + "outside_frac"], out.outside.sum() / n, "outside_frac",
                  atol=1e-6)
    _assert_close(m[METRIC_PREFIX + "zero_weight_frac"],
                  ((out.weight == 0) & mask).sum() / n, "zero_weight_frac", atol=1e-6)
    _assert_close(m[METRIC_PREFIX + "weight_min"].to(F64), out.weight[mask].min().to(F64),
                  "weight_min")
    _assert_close(m[METRIC_PREFIX + "weight_max"].to(F64), out.weight[mask].max().to(F64),
                  "weight_max")


class _HostSync(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Make every tensor → host read raise inside the block."""
    names = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {name: getattr(Tensor, name) for name in names}

    def refuse(name: str) -> Callable[..., None]:
        def method(*args: object, **kwargs: object) -> None:
            raise _HostSync(f"Tensor.{name}() synchronises with the host in the hot path")
        return method

    try:
        for name in names:
            setattr(Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(Tensor, name, method)


def check_no_host_sync(strategy: TrustRegionStrategy) -> None:
    strategy(_random_batch(seed=7))
    batch = _random_batch(seed=8)
    with forbid_host_sync():
        out = strategy(batch)
        out.token_loss.sum().backward()


def check_hparams(strategy: TrustRegionStrategy) -> None:
    hparams = strategy.hparams()
    rebuilt = type(strategy)(**hparams)
    assert rebuilt.hparams() == hparams, "rebuilding from hparams() changed the hyperparameters"
    batch = _random_batch(seed=6)
    _assert_close(rebuilt(batch).token_loss, strategy(batch).token_loss,
                  "a strategy rebuilt from hparams() computes a different loss", atol=0)
    other = type(strategy)(**hparams)
    other.scale_width(2.0)
    other.load_state_dict(strategy.state_dict())
    assert other.hparams() == hparams, "load_state_dict(state_dict()) must restore hparams"
    assert type(strategy).__name__ in repr(strategy)


CONFORMANCE_CHECKS: dict[str, Callable[[TrustRegionStrategy], None]] = {
    "gradient_weight": check_gradient_weight,
    "regions": check_regions,
    "masking": check_masking,
    "micro_batch": check_micro_batch,
    "bf16": check_bf16,
    "on_policy": check_on_policy,
    "limit": check_limit,
    "empty_mask": check_empty_mask,
    "metrics": check_metrics,
    "no_host_sync": check_no_host_sync,
    "hparams": check_hparams,
}


def run_check(name: str, strategy: TrustRegionStrategy) -> str | None:
    """Run one check on a copy of ``strategy``; returns the reason if it was skipped."""
    if name not in CONFORMANCE_CHECKS:
        raise ValueError(f"unknown check {name!r}; known: {sorted(CONFORMANCE_CHECKS)}")
    try:
        CONFORMANCE_CHECKS[name](copy.deepcopy(strategy))
    except SkipCheck as skip:
        return str(skip)
    return None


def check_strategy(strategy: TrustRegionStrategy) -> ConformanceReport:
    """Run every conformance check; raises ``AssertionError`` naming the first that fails."""
    report = ConformanceReport()
    for name in CONFORMANCE_CHECKS:
        try:
            reason = run_check(name, strategy)
        except AssertionError as err:
            raise AssertionError(f"{type(strategy).__name__} fails check {name!r}: {err}") from err
        if reason is None:
            report.passed.append(name)
        else:
            report.skipped[name] = reason
    return report
