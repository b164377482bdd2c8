"""Bad inputs and bad hyperparameters fail early with messages that say what is wrong."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from trustregion.functional import aggregate
from trustregion.strategies import (
    CISPO,
    DRPO,
    GSPO,
    SPO,
    DivergenceMask,
    LogRatioQuadratic,
    RatioClip,
    TokenBatch,
    available_strategies,
    get_strategy,
    strategy_class,
)
from trustregion.strategies.base import TrustRegionStrategy

F64 = torch.float64
P = "trust_region/"


def good_batch(**overrides: object) -> TokenBatch:
    """2 sequences × 3 tokens; the last token of sequence 1 is padding."""
    fields: dict[str, object] = {
        "logp": torch.tensor([[-0.5, -1.0, -2.0], [-0.7, -0.2, -3.0]], dtype=F64),
        "behavior_logp": torch.tensor([[-0.6, -0.9, -2.2], [-0.7, -0.3, -3.0]], dtype=F64),
        "advantages": torch.tensor([1.0, -0.5], dtype=F64),
        "mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    fields.update(overrides)
    return TokenBatch(**fields)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- shapes/dtypes

def test_logp_must_be_2d() -> None:
    batch = good_batch(logp=torch.zeros(2, 3, 1, dtype=F64))
    message = "TokenBatch.logp must be shaped [batch, time]; got (2, 3, 1)"
    with pytest.raises(ValueError, match=re.escape(message)):
        DRPO()(batch)


def test_behavior_logp_shape_mismatch_names_the_tensor() -> None:
    batch = good_batch(behavior_logp=torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match=re.escape(
            "TokenBatch.behavior_logp has shape (2, 4), but logp has (2, 3)")):
        DRPO()(batch)


def test_mask_and_old_logp_shape_mismatch_name_the_tensor() -> None:
    with pytest.raises(ValueError, match=re.escape("TokenBatch.mask has shape (3, 2)")):
        DRPO()(good_batch(mask=torch.ones(3, 2)))
    with pytest.raises(ValueError, match=re.escape("TokenBatch.old_logp has shape (2,)")):
        DRPO()(good_batch(old_logp=torch.zeros(2, dtype=F64)))


@pytest.mark.parametrize("shape", [(3,), (2, 2), (2, 3, 1), (1, 3)])
def test_advantages_of_wrong_shape(shape: tuple[int, ...]) -> None:
    batch = good_batch(advantages=torch.zeros(shape, dtype=F64))
    with pytest.raises(ValueError, match=re.escape(
            f"TokenBatch.advantages has shape {shape}; allowed: [batch] = (2,) "
            "or [batch, time] = (2, 3)")):
        DRPO()(batch)


def test_per_token_advantages_are_accepted() -> None:
    # [batch, time] advantages equal to the broadcast [batch] ones give the same loss
    per_seq = DRPO()(good_batch()).token_loss
    per_token = DRPO()(good_batch(advantages=torch.tensor([[1.0] * 3, [-0.5] * 3],
                                                          dtype=F64))).token_loss
    torch.testing.assert_close(per_token, per_seq, atol=0, rtol=0)


def test_integer_logp_names_the_dtype() -> None:
    batch = good_batch(logp=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape(
            "TokenBatch.logp has dtype torch.int64; it must be a floating-point tensor")):
        DRPO()(batch)


def test_integer_advantages_name_the_tensor() -> None:
    batch = good_batch(advantages=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=re.escape("TokenBatch.advantages has dtype torch.int64")):
        RatioClip()(batch)


def test_topk_tensors_go_together() -> None:
    batch = good_batch(topk_logp=torch.zeros(2, 3, 4, dtype=F64))
    message = "TokenBatch.topk_logp and TokenBatch.topk_behavior_logp go together"
    with pytest.raises(ValueError, match=re.escape(message)):
        DRPO()(batch)


# ---------------------------------------------------------------------------------- finiteness

def test_nan_in_logp_on_unmasked_tokens_reports_the_count() -> None:
    logp = torch.tensor([[math.nan, -1.0, math.inf], [-0.7, -0.2, -3.0]], dtype=F64)
    # two non-finite unmasked values, one of them NaN
    with pytest.raises(ValueError, match=re.escape("logp: 2 non-finite value(s) (1 NaN)")):
        DRPO()(good_batch(logp=logp))


def test_nan_in_advantages_reports_the_tensor() -> None:
    with pytest.raises(ValueError, match=re.escape("advantages: 1 non-finite value(s) (1 NaN)")):
        DRPO()(good_batch(advantages=torch.tensor([math.nan, -0.5], dtype=F64)))


def test_every_bad_tensor_is_listed() -> None:
    logp = torch.tensor([[math.nan, -1.0, -2.0], [-0.7, -0.2, -3.0]], dtype=F64)
    behavior_logp = torch.tensor([[-0.6, -math.inf, -2.2], [-0.7, math.nan, -3.0]], dtype=F64)
    with pytest.raises(ValueError) as err:
        RatioClip()(good_batch(logp=logp, behavior_logp=behavior_logp,
                               advantages=torch.tensor([1.0, math.inf], dtype=F64)))
    message = str(err.value)
    assert "non-finite values on unmasked tokens" in message
    assert "logp: 1 non-finite value(s) (1 NaN)" in message
    assert "behavior_logp: 2 non-finite value(s) (1 NaN)" in message
    assert "advantages: 1 non-finite value(s) (0 NaN)" in message


def test_nan_on_masked_tokens_is_accepted() -> None:
    # position [1, 2] is padding: garbage there is fine and gives exactly zero loss
    logp = torch.tensor([[-0.5, -1.0, -2.0], [-0.7, -0.2, math.nan]], dtype=F64)
    behavior_logp = torch.tensor([[-0.6, -0.9, -2.2], [-0.7, -0.3, math.inf]], dtype=F64)
    batch = good_batch(logp=logp.requires_grad_(True), behavior_logp=behavior_logp)
    out = DRPO()(batch)
    clean = DRPO()(good_batch())
    assert out.token_loss[1, 2].item() == 0.0
    torch.testing.assert_close(out.token_loss, clean.token_loss, atol=0, rtol=0)
    out.token_loss.sum().backward()
    assert batch.logp.grad is not None and batch.logp.grad[1, 2].item() == 0.0
    # a per-sequence advantage of a fully masked sequence may be NaN as well
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    DRPO()(good_batch(mask=mask, advantages=torch.tensor([1.0, math.nan], dtype=F64)))


@pytest.mark.parametrize("strategy", [DRPO(), RatioClip(dual_clip_cap=3.0), DivergenceMask(),
                                      CISPO(), GSPO(), SPO(), LogRatioQuadratic()],
                         ids=lambda s: type(s).__name__)
def test_all_zero_mask_gives_zero_loss_and_finite_metrics(strategy: TrustRegionStrategy) -> None:
    batch = good_batch(mask=torch.zeros(2, 3), logp=good_batch().logp.requires_grad_(True))
    out = strategy(batch)
    assert out.token_loss.tolist() == [[0.0] * 3] * 2
    assert aggregate(out.token_loss, batch.mask, "token-mean").item() == 0.0
    out.token_loss.sum().backward()
    assert batch.logp.grad is not None and bool((batch.logp.grad == 0).all())
    # every metric is a finite 0 (empty reductions give 0)
    for name, value in out.metrics.items():
        assert value.item() == 0.0, name


def test_old_anchor_without_old_logp_raises() -> None:
    with pytest.raises(ValueError, match=re.escape("DRPO(anchor='old') needs TokenBatch.old_logp")):
        DRPO(anchor="old")(good_batch())
    with pytest.raises(ValueError, match=re.escape("RatioClip(anchor='old') needs")):
        RatioClip(anchor="old")(good_batch())


# ----------------------------------------------------------------------------- hyperparameters

@pytest.mark.parametrize(("build", "pattern"), [
    (lambda: DRPO(delta=0.0), "delta must be > 0"),
    (lambda: DRPO(delta=-0.1), "delta must be > 0"),
    (lambda: DRPO(delta=math.nan), "delta must be > 0"),
    (lambda: DRPO(delta=None), "delta must be > 0, or inf for no bound ("),  # type: ignore
    (lambda: DRPO(delta_low=0.0), "delta_low must be > 0"),
    (lambda: DRPO(delta_high=-1.0), "delta_high must be > 0"),
    (lambda: DivergenceMask(delta=0.0), "delta must be > 0"),
    (lambda: DivergenceMask(delta_high=-0.1), "delta_high must be > 0"),
    (lambda: RatioClip(epsilon=-0.1), "epsilon must be a number ≥ 0"),
    (lambda: RatioClip(epsilon_low=-0.1), "epsilon_low must be a number ≥ 0"),
    (lambda: RatioClip(epsilon_high=-0.01), "epsilon_high must be a number ≥ 0"),
    (lambda: RatioClip(epsilon=math.nan), "epsilon must be a number ≥ 0"),
    (lambda: RatioClip(epsilon=True), "epsilon must be a number ≥ 0"),  # type: ignore
    (lambda: CISPO(epsilon_high=-0.1), "epsilon_high must be a number ≥ 0"),
    (lambda: GSPO(epsilon_low=-1e-4), "epsilon_low must be a number ≥ 0"),
    (lambda: SPO(epsilon=0.0), "epsilon must be > 0"),
    (lambda: SPO(epsilon_low=0.0), "epsilon_low must be > 0"),
    (lambda: SPO(epsilon_high=-0.2), "epsilon_high must be > 0"),
    (lambda: RatioClip(dual_clip_cap=1.0), "dual_clip_cap must be > 1"),
    (lambda: RatioClip(dual_clip_cap=0.5), "dual_clip_cap must be > 1"),
    (lambda: DivergenceMask(divergence="chi2"), "unknown divergence 'chi2'"),  # type: ignore
    (lambda: DRPO(anchor="reference"), "anchor must be one of"),  # type: ignore[arg-type]
    (lambda: DivergenceMask(anchor="ref"), "anchor must be one of"),  # type: ignore[arg-type]
    (lambda: LogRatioQuadratic(penalty_strength=0.0),
     "penalty_strength must be a finite number > 0"),
    (lambda: LogRatioQuadratic(penalty_strength=-1.0),
     "penalty_strength must be a finite number > 0"),
    (lambda: LogRatioQuadratic(penalty_strength=math.inf),
     "penalty_strength must be a finite number > 0"),
    (lambda: DivergenceMask(importance_weight_cap=0.0), "importance_weight_cap must be > 0"),
    (lambda: DivergenceMask(importance_weight_cap=-5.0), "importance_weight_cap must be > 0"),
    (lambda: DivergenceMask(divergence_top_k=0), "divergence_top_k must be an integer ≥ 1"),
    (lambda: DivergenceMask(divergence_top_k=2.5), "divergence_top_k must be an integer ≥ 1"),
])
def test_invalid_hyperparameters_raise_at_construction(build, pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(pattern)):
        build()


def test_unknown_divergence_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'binary_tv', 'binary_kl', 'topk_tv', 'topk_kl'"):
        DivergenceMask(divergence="tv")  # type: ignore[arg-type]


def test_unknown_anchor_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=re.escape("('behavior', 'old')")):
        RatioClip(anchor="behaviour")  # type: ignore[arg-type]


def test_valid_edge_hyperparameters_are_accepted() -> None:
    # ε = 0 (no movement allowed), no dual clip, no truncation cap are all legitimate
    assert RatioClip(epsilon=0.0).bounds == (1.0, 1.0)
    assert DivergenceMask(importance_weight_cap=math.inf).importance_weight_cap == math.inf
    assert RatioClip(dual_clip_cap=math.inf).dual_clip_cap == math.inf
    # inf is "no bound" for every half-width
    assert RatioClip(epsilon_low=math.inf).bounds == (-math.inf, 1.2)
    assert CISPO(epsilon_high=math.inf).bounds == (-math.inf, math.inf)
    assert DRPO(delta_high=math.inf).deltas == (0.15, math.inf)


@pytest.mark.parametrize(
    ("factory", "name", "allowed"),
    [
        (lambda: RatioClip(epsilon=None), "epsilon", "a number ≥ 0, or inf for no bound ("),
        (lambda: CISPO(epsilon=None), "epsilon", "a number ≥ 0, or inf for no bound ("),
        (lambda: GSPO(epsilon=None), "epsilon", "a number ≥ 0, or inf for no bound ("),
        (lambda: SPO(epsilon=None), "epsilon", "> 0, or inf for no bound ("),
        (lambda: RatioClip(dual_clip_cap=None), "dual_clip_cap",
         "> 1, or inf to turn the dual clip off ("),
        (lambda: DivergenceMask(importance_weight_cap=None), "importance_weight_cap",
         "> 0, or inf for no truncation ("),
    ],
)
def test_none_is_refused_where_there_is_nothing_to_inherit(factory, name, allowed) -> None:
    # the symmetric value and the caps inherit from nothing: None would be ambiguous
    with pytest.raises(ValueError, match=re.escape(f"{name} must be {allowed}") + r".*got None"):
        factory()


@pytest.mark.parametrize(
    ("factory", "name", "inherits"),
    [
        (lambda: RatioClip(epsilon_low=-1.0), "epsilon_low", "epsilon"),
        (lambda: CISPO(epsilon_high=math.nan), "epsilon_high", "epsilon"),
        (lambda: GSPO(epsilon_high=-0.1), "epsilon_high", "epsilon"),
        (lambda: DRPO(delta_low=-0.1), "delta_low", "delta"),
        (lambda: DivergenceMask(delta=-0.1), "delta", "the divergence's default (0.15)"),
    ],
)
def test_one_sided_messages_name_what_none_inherits(factory, name, inherits) -> None:
    with pytest.raises(ValueError, match=re.escape(f"or None to inherit {inherits} (")):
        factory()


# ------------------------------------------------------------- bounds no token could ever reach

@pytest.mark.parametrize(("build", "message"), [
    # r > 0 (and GSPO's s > 0): a lower bound 1 − ε_low ≤ 0 would never clip anything
    (lambda: RatioClip(epsilon_low=1.5),
     "epsilon_low must be a number ≥ 0 and < 1, or inf for no bound, or None to inherit epsilon"
     " (the lower clip half-width: the region starts at r = 1 − ε_low, and r > 0, so ε_low ≥ 1 "
     "would never clip); got 1.5"),
    (lambda: RatioClip(epsilon_low=1.0), "epsilon_low must be a number ≥ 0 and < 1"),
    (lambda: GSPO(epsilon_low=2),
     "epsilon_low must be a number ≥ 0 and < 1, or inf for no bound, or None to inherit epsilon"
     " (lower half-width: the region starts at s = 1 − ε_low, and s > 0, so ε_low ≥ 1 would "
     "never clip); got 2"),
    (lambda: CISPO(epsilon_low=1.5), "epsilon_low must be a number ≥ 0 and < 1"),
    # the symmetric value is refused only when the lower side inherits it
    (lambda: RatioClip(epsilon=1.5),
     "epsilon=1.5 is inherited by epsilon_low (None), which must be < 1, or inf for no bound "
     "(the region starts at r = 1 − ε_low, and r > 0); set epsilon_low on its own, or give "
     "epsilon a value < 1"),
    (lambda: GSPO(epsilon=3.0), "epsilon=3.0 is inherited by epsilon_low (None)"),
    (lambda: CISPO(epsilon=1.0), "epsilon=1.0 is inherited by epsilon_low (None)"),
    # a total variation is at most 1: a TV half-width ≥ 1 would never drop a token
    (lambda: DivergenceMask(delta=1.0), "delta must be > 0 and < 1, or inf for no bound"),
    (lambda: DivergenceMask(divergence="topk_tv", delta_low=2.0),
     "delta_low must be > 0 and < 1, or inf for no bound, or None to inherit delta (the "
     "trust-region half-width of the topk_tv divergence, which never exceeds 1, for Â < 0 "
     "tokens); got 2.0"),
])
def test_a_bound_no_token_can_reach_is_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_bounds_that_can_act_are_accepted() -> None:
    # 1 − 0.999 = 0.001 > 0: still a lower bound a ratio can cross
    assert RatioClip(epsilon_low=0.999).bounds == pytest.approx((0.001, 1.2))
    # a wide symmetric value is fine when the lower side is set on its own: [0.8, 2.5]
    assert RatioClip(epsilon=1.5, epsilon_low=0.2).bounds == pytest.approx((0.8, 2.5))
    # inf still says "no lower bound" plainly, set or inherited
    assert GSPO(epsilon=math.inf).bounds == (-math.inf, 1 + 4e-4)
    assert CISPO().bounds == (-math.inf, 1.28)
    # KL divergences are unbounded, and DRPO's δ = 12.5 is its published reference setting
    assert DivergenceMask(divergence="binary_kl", delta=2.0).deltas == (2.0, 2.0)
    assert DivergenceMask(delta=0.99).deltas == (0.99, 0.99)
    assert DRPO(delta=12.5).deltas == (12.5, 12.5)


# --------------------------------------------------------- every setting checks its own type

def _settings(name: str) -> list[str]:
    return [p for p in inspect.signature(strategy_class(name).__init__).parameters
            if p != "self"]


@pytest.mark.parametrize(("name", "setting"), [
    (name, setting) for name in available_strategies() for setting in _settings(name)])
def test_a_string_where_a_setting_belongs_names_the_setting(name: str, setting: str) -> None:
    # e.g. DRPO(delta="big"): "delta must be > 0, or inf for no bound (...); got 'big'", never
    # a TypeError from comparing a string with a number
    with pytest.raises(ValueError) as err:
        get_strategy(name, **{setting: "big"})
    message = str(err.value)
    assert setting in message and "'big'" in message, message


# ------------------------------------------------------------------- TokenBatch input values

def test_a_list_instead_of_a_tensor_names_the_field() -> None:
    batch = good_batch(logp=[[-0.5, -1.0, -2.0], [-0.7, -0.2, -3.0]])
    with pytest.raises(ValueError, match=re.escape(
            "TokenBatch.logp must be a torch.Tensor; got list (build it with torch.tensor(...))")):
        DRPO()(batch)
    with pytest.raises(ValueError, match=re.escape(
            "TokenBatch.old_logp must be a torch.Tensor or None; got tuple")):
        DRPO()(good_batch(old_logp=(-0.6, -0.9)))


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_an_empty_batch_is_refused(shape: tuple[int, int]) -> None:
    empty = torch.zeros(shape, dtype=F64)
    batch = TokenBatch(logp=empty, behavior_logp=empty, advantages=torch.zeros(shape[0]),
                       mask=empty.bool())
    with pytest.raises(ValueError, match=re.escape(
            f"TokenBatch holds no tokens: logp has shape {shape} = [batch, time]")):
        RatioClip()(batch)


def test_a_log_prob_above_zero_is_refused() -> None:
    # 0.5 and 0.0011 exceed the tolerance 1e-3; 0.0005 is rounding and is accepted
    logp = torch.tensor([[0.5, -1.0, 0.0011], [-0.7, 0.0005, -3.0]], dtype=F64)
    message = ("TokenBatch log-probs must be ≤ 0 (a probability is at most 1; values up to "
               "0.001 are allowed for rounding) — logp: 2 value(s) > 0, largest 0.5")
    with pytest.raises(ValueError, match=re.escape(message)):
        DRPO()(good_batch(logp=logp))
    behavior_logp = torch.tensor([[-0.6, -0.9, -2.2], [-0.7, 2.0, -3.0]], dtype=F64)
    with pytest.raises(ValueError, match=re.escape("behavior_logp: 1 value(s) > 0, largest 2")):
        RatioClip()(good_batch(behavior_logp=behavior_logp))


def test_log_probs_within_the_tolerance_or_masked_are_accepted() -> None:
    # [1, 2] is padding: 7.0 there is ignored; 0.0005 ≤ 1e-3 is accepted as rounding
    logp = torch.tensor([[-0.5, -1.0, 0.0005], [-0.7, -0.2, 7.0]], dtype=F64)
    out = RatioClip()(good_batch(logp=logp))
    assert out.token_loss[1, 2].item() == 0.0


def test_positive_top_k_log_probs_are_refused() -> None:
    topk = torch.full((2, 3, 2), -1.0, dtype=F64)
    bad = topk.clone()
    bad[0, 1, 0] = 0.3
    batch = good_batch(topk_logp=bad, topk_behavior_logp=topk)
    with pytest.raises(ValueError, match=re.escape("topk_logp: 1 value(s) > 0, largest 0.3")):
        DivergenceMask(divergence="topk_tv")(batch)


def test_a_fractional_mask_is_refused() -> None:
    mask = torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    message = ("TokenBatch.mask must hold only 0 and 1 (or be bool); 1 value(s) are neither, "
               "e.g. 0.5. A mask selects tokens, it does not weight them")
    with pytest.raises(ValueError, match=re.escape(message)):
        DRPO()(good_batch(mask=mask))
    with pytest.raises(ValueError, match=re.escape("2 value(s) are neither, e.g. 2")):
        DRPO()(good_batch(mask=torch.tensor([[1, 2, 1], [2, 1, 0]])))


def test_integer_float_and_bool_masks_of_0_and_1_agree() -> None:
    expected = DRPO()(good_batch()).token_loss  # integer mask
    for mask in (torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]),
                 torch.tensor([[True, True, True], [True, True, False]])):
        torch.testing.assert_close(DRPO()(good_batch(mask=mask)).token_loss, expected,
                                   atol=0, rtol=0)


def test_check_values_reads_every_batch_when_called() -> None:
    # strategies check values on their first batch only; check_values() checks any batch
    strategy = DRPO()
    strategy(good_batch())
    late = good_batch(mask=torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match=re.escape("TokenBatch.mask must hold only 0 and 1")):
        late.check_values()
