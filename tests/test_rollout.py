from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trustregion.models.loading import load_model
from trustregion.rollout import (
    SamplingSettings,
    completion_logits,
    completion_mask_from,
    generate_rollout,
)
from trustregion.tasks import Arithmetic


def _model(random_model_dir: Path):
    torch.manual_seed(0)
    model, tokenizer = load_model(f"config:{random_model_dir}")
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def _rollout(random_model_dir: Path, record_topk: int = 0, **sampling):
    model, tokenizer = _model(random_model_dir)
    examples = Arithmetic().examples(3, seed=1)  # prompts of different lengths → left padding
    torch.manual_seed(1)
    settings = SamplingSettings(max_new_tokens=8, **sampling)
    rollout = generate_rollout(model, tokenizer, examples, group_size=2, sampling=settings,
                               topk=record_topk)
    with torch.no_grad():
        logits = completion_logits(model, rollout).double() / settings.temperature
    return rollout, logits


def test_completion_mask_keeps_the_first_eos_and_drops_what_follows() -> None:
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert completion_mask_from(ids, [2]).int().tolist() == expected


def test_behavior_logp_is_the_tempered_distribution_it_sampled_from(random_model_dir) -> None:
    rollout, logits = _rollout(random_model_dir, temperature=0.7)
    expected = logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    mask = rollout.completion_mask
    assert len(rollout) == 6 and rollout.examples[0] == rollout.examples[1]
    torch.testing.assert_close(rollout.behavior_logp[mask].double(), expected[mask],
                               atol=1e-5, rtol=0)
    assert bool((rollout.behavior_logp[~mask] == 0).all())


def test_top_k_truncation_renormalises_over_the_kept_tokens(random_model_dir) -> None:
    rollout, logits = _rollout(random_model_dir, top_k=3)
    # log p_trunc(y) = x_y − logsumexp over the 3 largest logits (y is always among them)
    top3 = logits.topk(3, dim=-1).values
    chosen = logits.gather(-1, rollout.completion_ids[..., None])[..., 0]
    expected = chosen - top3.logsumexp(-1)
    mask = rollout.completion_mask
    torch.testing.assert_close(rollout.behavior_logp[mask].double(), expected[mask],
                               atol=1e-5, rtol=0)
    full = logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    assert bool((rollout.behavior_logp[mask].double() >= full[mask] - 1e-6).all())
    assert bool((chosen[mask] >= top3[..., -1][mask] - 1e-9).all())


def test_top_p_truncation_renormalises_over_the_nucleus(random_model_dir) -> None:
    rollout, logits = _rollout(random_model_dir, top_p=0.8)
    # The nucleus: tokens by descending probability while the mass before each is < 0.8 (the
    # smallest set holding at least 0.8); log p_trunc(y) = x_y − logsumexp over the nucleus.
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(-1) - probs
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before < 0.8)
    nucleus_lse = logits.masked_fill(~kept, -math.inf).logsumexp(-1)
    chosen = logits.gather(-1, rollout.completion_ids[..., None])[..., 0]
    mask = rollout.completion_mask
    assert bool(kept.gather(-1, rollout.completion_ids[..., None])[..., 0][mask].all())
    torch.testing.assert_close(rollout.behavior_logp[mask].double(),
                               (chosen - nucleus_lse)[mask], atol=1e-5, rtol=0)
    full = logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    assert bool((rollout.behavior_logp[mask].double() > full[mask]).any())  # truncation bit


def test_topk_records_behaviour_top_ids_plus_the_sampled_token(random_model_dir) -> None:
    rollout, logits = _rollout(random_model_dir, record_topk=2, top_k=3)
    assert rollout.topk_ids is not None and rollout.topk_behavior_logp is not None
    ids, logp = rollout.topk_ids, rollout.topk_behavior_logp
    assert ids.shape == (*rollout.completion_ids.shape, 3)  # K = 2 tracked + the sampled slot
    sampled = rollout.completion_ids
    mask = rollout.completion_mask
    # the last slot always holds the sampled id and its behaviour log-prob
    assert bool((ids[..., 2] == sampled).all())
    torch.testing.assert_close(logp[..., 2][mask], rollout.behavior_logp[mask])
    # the tracked slots are the top-2 ids in order, the sampled one blanked to −1 (log-prob −inf)
    top2 = logits.topk(2, dim=-1).indices
    is_sampled = top2 == sampled[..., None]
    assert bool(torch.where(is_sampled, ids[..., :2] == -1, ids[..., :2] == top2)[mask].all())
    assert bool((logp[..., :2][is_sampled & mask[..., None]] == -math.inf).all())
    assert bool(is_sampled[mask].any())  # the sampled token is often the top one


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0.0}, r"temperature must be a finite number in \(0.0, inf\)"),
        ({"top_p": 0.0}, r"top_p must be a finite number in \(0.0, 1.0\]"),
        ({"top_k": -1}, "top_k must be an integer ≥ 0"),
        ({"top_k": 2.5}, "top_k must be an integer ≥ 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer ≥ 1"),
        ({"max_new_tokens": 4.0}, "max_new_tokens must be an integer ≥ 1"),
    ],
)
def test_bad_sampling_settings(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**settings)
