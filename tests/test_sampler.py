"""The lean sampler (trustregion.sampler) against its straightforward twin, Hugging Face
``generate`` (``SamplingSettings(sampler="generate")``)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM

from trustregion import sampler as lean
from trustregion.functional.logprobs import token_logprobs
from trustregion.models import build_char_tokenizer
from trustregion.models.architectures import ARCHITECTURES, tiny_config
from trustregion.rollout import (
    Rollout,
    SamplingSettings,
    completion_logits,
    encode_prompts,
    generate_rollout,
)
from trustregion.tasks import Arithmetic

EOS = build_char_tokenizer().eos_token_id


def _tokenizer() -> Any:
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def _model(architecture: str = "llama", seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = tiny_config(architecture, len(_tokenizer()), hidden_size=32, num_hidden_layers=2,
                         intermediate_size=64, initializer_range=0.3)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _examples(count: int = 3) -> list[Any]:
    examples = Arithmetic().examples(count, seed=1)
    assert len({len(ex.prompt) for ex in examples}) > 1  # different lengths: left padding
    return examples


def _rollout(model: Any, sampler: str, *, seed: int = 5, group_size: int = 3,
             examples: list[Any] | None = None, topk: int = 0, **sampling: Any) -> Rollout:
    settings = SamplingSettings(sampler=sampler, **{"max_new_tokens": 10, **sampling})
    torch.manual_seed(seed)
    return generate_rollout(model, _tokenizer(), examples or _examples(), group_size=group_size,
                            sampling=settings, topk=topk)


def _end_after(model: Any, token: int) -> None:
    """Make the model end a completion right after ``token``: its next-token logits get EOS
    raised by 100 wherever the last input is ``token`` (both samplers see the same logits)."""

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        last = kwargs["input_ids"][:, -1]
        output.logits[:, -1, EOS] += 100.0 * (last == token)
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def _token_some_groups_sample(rollout: Rollout, group_size: int) -> int:
    """A token the greedy completions of some groups hold and of others do not."""
    groups = rollout.completion_ids.reshape(-1, group_size, rollout.completion_ids.shape[1])
    holders: dict[int, set[int]] = {}
    for group, ids in enumerate(groups[:, 0]):
        for token in ids[1:-1].tolist():  # an EOS after it still fits in the completion
            holders.setdefault(token, set()).add(group)
    return next(t for t, g in sorted(holders.items()) if 0 < len(g) < len(groups))


# ----------------------------------------------------------------------- greedy equality
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_greedy_lean_equals_generate_on_every_family(architecture: str) -> None:
    model = _model(architecture)
    # top_k=1 keeps only the argmax: sampling is deterministic
    probe = _rollout(model, "lean", top_k=1)
    _end_after(model, _token_some_groups_sample(probe, 3))
    fast = _rollout(model, "lean", top_k=1, topk=2)
    slow = _rollout(model, "generate", top_k=1, topk=2)
    ended = fast.completion_mask.sum(-1) < fast.completion_ids.shape[1]
    assert bool(ended.any()) and not bool(ended.all())  # some rows hit EOS, some do not
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    assert torch.equal(fast.prompt_ids, slow.prompt_ids)
    torch.testing.assert_close(fast.behavior_logp, slow.behavior_logp, atol=1e-5, rtol=0)
    assert fast.completions == slow.completions
    # top-K slots: the same layout and values as the generate path's
    assert fast.topk_ids is not None and slow.topk_ids is not None
    assert torch.equal(fast.topk_ids, slow.topk_ids)
    assert fast.topk_behavior_logp is not None and slow.topk_behavior_logp is not None
    mask = fast.completion_mask
    torch.testing.assert_close(fast.topk_behavior_logp[mask], slow.topk_behavior_logp[mask],
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------- recorded log-probs are right
def _reference_processing(logits: torch.Tensor, temperature: float, top_k: int,
                          top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p written out independently of the sampler, in float64."""
    scores = logits.double() / temperature
    if top_k > 0:
        kth = scores.sort(dim=-1, descending=True).values[..., top_k - 1:top_k]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        probs, order = scores.softmax(-1).sort(dim=-1, descending=True)
        # keep a token while the mass of the more likely ones is below top_p (ties aside, the
        # complement of "ascending cumulative ≤ 1 − top_p")
        keep = (probs.cumsum(-1) - probs) < top_p
        kept = torch.zeros_like(keep).scatter(-1, order, keep)
        scores = scores.masked_fill(~kept, -math.inf)
    return scores


def test_sampled_logprobs_equal_the_policys_with_the_same_processing() -> None:
    model = _model()
    rollout = _rollout(model, "lean", temperature=0.7, top_p=0.9, top_k=5, seed=3)
    with torch.no_grad():
        scores = _reference_processing(completion_logits(model, rollout), 0.7, 5, 0.9)
    expected = scores.log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    mask = rollout.completion_mask
    torch.testing.assert_close(rollout.behavior_logp[mask].double(), expected[mask],
                               atol=1e-5, rtol=0)
    assert bool((rollout.behavior_logp[~mask] == 0).all())


def test_untruncated_logprobs_equal_the_policys_tempered_logprobs() -> None:
    model = _model()
    rollout = _rollout(model, "lean", temperature=0.7, seed=4)
    with torch.no_grad():
        expected = token_logprobs(completion_logits(model, rollout) / 0.7,
                                  rollout.completion_ids)
    mask = rollout.completion_mask
    torch.testing.assert_close(rollout.behavior_logp[mask], expected[mask], atol=1e-5, rtol=0)


def test_process_scores_by_hand() -> None:
    # probs 0.4, 0.3, 0.2, 0.07, 0.03; ascending cumulative 0.03, 0.10, 0.30, 0.60, 1.00;
    # top_p 0.75 removes those ≤ 0.25: the 0.03 and 0.07 tokens; 3 kept with mass 0.9, so the
    # first renormalises to log(0.4 / 0.9)
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.07, 0.03]]).log()
    scores = lean.process_scores(logits, temperature=1.0, top_k=0, top_p=0.75)
    assert scores.isfinite().tolist() == [[True, True, True, False, False]]
    assert math.isclose(float(scores.log_softmax(-1)[0, 0]), math.log(0.4 / 0.9), abs_tol=1e-6)
    # top_k 2 keeps 0.4 and 0.3: log(0.4 / 0.7)
    scores = lean.process_scores(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert scores.isfinite().tolist() == [[True, True, False, False, False]]
    assert math.isclose(float(scores.log_softmax(-1)[0, 0]), math.log(0.4 / 0.7), abs_tol=1e-6)
    # temperature 0.5 doubles the log-probs: p ∝ 0.4², 0.3², ... → first = 0.16 / Σ p²
    scores = lean.process_scores(logits, temperature=0.5, top_k=0, top_p=1.0)
    squares = 0.4**2 + 0.3**2 + 0.2**2 + 0.07**2 + 0.03**2  # = 0.2958
    assert math.isclose(float(scores.softmax(-1)[0, 0]), 0.16 / squares, rel_tol=1e-6)
    # top_p small keeps only the most likely token
    scores = lean.process_scores(logits, temperature=1.0, top_k=0, top_p=0.01)
    assert scores.isfinite().tolist() == [[True, False, False, False, False]]


# ------------------------------------------------------------------------------ seeding
def test_the_same_seed_gives_the_same_rollout() -> None:
    model = _model()
    first = _rollout(model, "lean", seed=9)
    second = _rollout(model, "lean", seed=9)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.behavior_logp, second.behavior_logp)
    assert not torch.equal(first.completion_ids, _rollout(model, "lean", seed=10).completion_ids)


def test_lean_draws_the_tokens_generate_draws_from_the_same_seed() -> None:
    model = _model()
    fast = _rollout(model, "lean", seed=11)
    slow = _rollout(model, "generate", seed=11)
    assert len({tuple(row) for row in fast.completion_ids.tolist()}) > 3  # really sampled
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    torch.testing.assert_close(fast.behavior_logp, slow.behavior_logp, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- stopping
def test_the_loop_stops_when_every_row_has_ended() -> None:
    model = _model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    # EOS after every token the first step can sample: each row ends at step 2 of 10
    model.register_forward_hook(_every_token_ends, with_kwargs=True)
    rollout = _rollout(model, "lean")
    assert rollout.completion_ids.shape[1] == 2
    assert bool((rollout.completion_ids[:, 1] == EOS).all())
    assert bool(rollout.completion_mask.all())
    assert len(calls) == 2  # one prefill and one decode step: the EOS is never fed back


def _every_token_ends(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    if kwargs["input_ids"].shape[1] == 1:  # a decode step
        output.logits[:, -1, EOS] += 1000.0
    return output


@pytest.mark.parametrize("sampler", ["lean", "generate"])
def test_ignore_eos_samples_exactly_max_new_tokens(sampler: str) -> None:
    model = _model()
    model.register_forward_hook(_every_token_ends, with_kwargs=True)
    rollout = _rollout(model, sampler, ignore_eos=True, max_new_tokens=6)
    assert rollout.completion_ids.shape[1] == 6
    assert bool(rollout.completion_mask.all())
    assert bool((rollout.completion_ids[:, 1:] == EOS).all())  # EOS is an ordinary token here
    assert bool((rollout.behavior_logp[:, 1:] > -1e-3).all())  # and was very likely


# ------------------------------------------------------------------------------ memory
def test_the_largest_logits_the_lean_sampler_sees_are_one_step() -> None:
    model = _model()
    shapes: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda module, args, output: shapes.append(
        tuple(output.logits.shape)))
    rollout = _rollout(model, "lean", group_size=4)
    vocab = model.config.vocab_size
    # the prefill runs the 3 distinct prompts once; every decode step all 3 × 4 rows
    assert shapes[0] == (3, 1, vocab)
    assert set(shapes[1:]) == {(12, 1, vocab)}
    assert len(rollout) == 12


# --------------------------------------------------------------------------- fallback
class _NoLogitsToKeep(LlamaForCausalLM):
    """A model whose forward does not take ``logits_to_keep``."""

    def forward(self, input_ids: Any = None, attention_mask: Any = None,  # type: ignore[override]
                position_ids: Any = None, cache: Any = None, use_cache: Any = None,
                **kwargs: Any) -> Any:
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, cache=cache, use_cache=use_cache,
                               **kwargs)


def test_a_model_the_loop_cannot_drive_falls_back_to_generate(monkeypatch) -> None:
    monkeypatch.setattr(lean, "FALLBACK_NOTES", set())
    torch.manual_seed(0)
    model = _NoLogitsToKeep(_model().config).eval()
    reason = lean.lean_sampler_support(model, transformers.GenerationConfig())
    assert reason == "_NoLogitsToKeep.forward does not accept logits_to_keep"
    with pytest.warns(UserWarning, match=r"lean sampler cannot run this model "
                                         r"\(_NoLogitsToKeep.forward does not accept "
                                         r"logits_to_keep\); rollouts are sampled with Hugging "
                                         r"Face generate"):
        fallen = _rollout(model, "lean", topk=2)
    slow = _rollout(model, "generate", topk=2)
    assert torch.equal(fallen.completion_ids, slow.completion_ids)
    assert torch.equal(fallen.behavior_logp, slow.behavior_logp)
    assert fallen.topk_ids is not None and slow.topk_ids is not None
    assert torch.equal(fallen.topk_ids, slow.topk_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        _rollout(model, "lean")


def test_generation_settings_generate_would_apply_make_the_loop_decline() -> None:
    model = _model()
    assert lean.lean_sampler_support(model, transformers.GenerationConfig()) is None
    model.generation_config.repetition_penalty = 1.3
    reason = lean.lean_sampler_support(model, transformers.GenerationConfig())
    assert reason is not None and "repetition_penalty" in reason


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampler": "vllm"}, r"sampler must be one of 'lean', 'generate'; got 'vllm'"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False; got 1"),
    ],
)
def test_bad_sampler_settings(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**settings)


# ---------------------------------------------------------------------------- encoding
def test_prompts_are_encoded_once_per_example_not_once_per_row(monkeypatch) -> None:
    model, tokenizer, examples = _model(), _tokenizer(), _examples()
    seen: list[int] = []
    original = type(tokenizer).__call__

    def counting(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, examples, group_size=4,
                               sampling=SamplingSettings(max_new_tokens=3))
    assert seen == [3]  # 3 prompts, not 3 × 4 rows
    encoded = encode_prompts(tokenizer, [ex.prompt for ex in examples])
    assert torch.equal(rollout.prompt_ids, encoded[0].repeat_interleave(4, dim=0))
    seen.clear()
    torch.manual_seed(0)
    again = generate_rollout(model, tokenizer, examples, group_size=4,
                             sampling=SamplingSettings(max_new_tokens=3), encoded=encoded)
    assert seen == []
    assert torch.equal(again.completion_ids, rollout.completion_ids)


def test_encoded_prompts_need_one_row_per_example() -> None:
    model, tokenizer, examples = _model(), _tokenizer(), _examples()
    ids, mask = encode_prompts(tokenizer, [ex.prompt for ex in examples for _ in range(2)])
    with pytest.raises(ValueError, match=r"one row per example \(3\); got shapes \(6, \d+\)"):
        generate_rollout(model, tokenizer, examples, group_size=2,
                         sampling=SamplingSettings(max_new_tokens=3), encoded=(ids, mask))


# ------------------------------------------------------------------------ routing record
@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral"])
def test_lean_routing_record_equals_generates(architecture: str) -> None:
    model = _model(architecture)
    settings = dict(top_k=1, max_new_tokens=6)
    records = []
    for sampler in ("lean", "generate"):
        torch.manual_seed(0)
        rollout = generate_rollout(model, _tokenizer(), _examples(), group_size=3,
                                   sampling=SamplingSettings(sampler=sampler, **settings),
                                   record_routing=True)
        records.append(rollout)
    fast, slow = records
    assert fast.routing is not None and slow.routing is not None
    prompt, completion = fast.prompt_ids.shape[1], fast.completion_ids.shape[1]
    assert fast.routing.shape == (9, 2, prompt + completion - 1, 2)
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    # at real tokens the expert sets agree (padding positions may route differently: they are
    # masked out of attention and of every log-prob)
    real = torch.cat([fast.prompt_mask, fast.completion_mask[:, :-1]], dim=1)
    same = (fast.routing.sort(-1).values == slow.routing.sort(-1).values).all(-1)  # [N, L, S]
    assert bool(same.permute(0, 2, 1)[real].all())
    # the prompt part was recorded once per group and repeated to its rows
    groups = fast.routing[:, :, :prompt].reshape(3, 3, 2, prompt, 2)
    assert bool((groups == groups[:, :1]).all())


# ------------------------------------------------------------- the module's rollouts
def test_a_rollout_tokenises_its_prompts_once(random_model_dir, monkeypatch) -> None:
    import lightning as L

    import trustregion.module
    from trustregion.batching import BatchSettings
    from trustregion.module import TrustRegionModule
    from trustregion.tasks import Example, Task

    class Clean(Task):
        """Generated prompts (checked batch by batch) the tokenizer fully covers."""

        name = "clean"

        def sample(self, rng: Any) -> Example:
            return Example(prompt=f"{rng.randint(1, 9)}+1=", answer="2")

    torch.manual_seed(0)
    module = TrustRegionModule(
        policy=f"config:{random_model_dir}", task=Clean(),
        batching=BatchSettings(group_size=2, prompts_per_step=2, mini_batch_size=4),
        sampling=SamplingSettings(max_new_tokens=2))
    tokenizer_calls: list[int] = []
    per_rollout: list[int] = []
    original_call = type(module.tokenizer).__call__
    original_rollout = TrustRegionModule.rollout

    def counting_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        tokenizer_calls.append(1)
        return original_call(self, *args, **kwargs)

    def counting_rollout(self: Any, batch: Any) -> Any:
        tokenizer_calls.clear()
        result = original_rollout(self, batch)
        per_rollout.append(len(tokenizer_calls))
        return result

    searched: list[int] = []
    monkeypatch.setattr(type(module.tokenizer), "__call__", counting_call)
    monkeypatch.setattr(TrustRegionModule, "rollout", counting_rollout)
    monkeypatch.setattr(trustregion.module, "unknown_tokens",
                        lambda *args: searched.append(1))
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    # one encoding serves the length check, the unknown-token check and the sampler (it was
    # three: one for each); without an unknown id in it, the prompts are not searched again
    assert per_rollout == [1, 1]
    assert searched == []
