"""The shared-prefix forward (trustregion.prefix_sharing): each prompt run once, completions
bucketed by length, checked against the full forward (completion_logits) it replaces."""

from __future__ import annotations

import contextlib
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import transformers
from conftest import DigitRichArithmetic
from step_keeper import KeepSteps

import trustregion.packing as packing
import trustregion.prefix_sharing as prefix_sharing
from trustregion.batching import BatchSettings
from trustregion.functional.logprobs import gather_logprobs, token_entropy, token_logprobs
from trustregion.models import build_char_tokenizer
from trustregion.models.architectures import ARCHITECTURES, MOE_ARCHITECTURES, tiny_config
from trustregion.models.char_tokenizer import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from trustregion.module import TrustRegionModule
from trustregion.packing import pack_units, packed_layout, sliding_window_of, tree_attention_mask
from trustregion.precision import PrecisionSettings
from trustregion.prefix_sharing import (
    Bucket,
    PositionCount,
    PrefixSharing,
    distinct_prompts,
    length_buckets,
    padding_buckets,
    prompt_routing_agrees,
    shared_prefix_logits,
    sharing_order,
)
from trustregion.rollout import Rollout, SamplingSettings, completion_logits, generate_rollout
from trustregion.routing import own_routing, recording_routing, replaying_routing
from trustregion.strategies import RatioClip
from trustregion.tasks import Arithmetic

TOKENIZER = build_char_tokenizer()
TOKENIZER.padding_side = "left"
VOCAB = len(TOKENIZER)
EOS = TOKENIZER.convert_tokens_to_ids(EOS_TOKEN)
PAD = TOKENIZER.convert_tokens_to_ids(PAD_TOKEN)

# 3 prompts of 7, 5 and 3 tokens × 4 completions; completion lengths 1..6, rows shorter than 6
# end at EOS (except the 6-token rows), then padding. With the 7-token prompt and 6-token
# completions, sequences of 13 tokens exceed Mistral's sliding window of 8.
PROMPT_LENGTHS = (7, 5, 3)
COMPLETION_LENGTHS = (6, 1, 4, 6, 2, 5, 6, 3, 1, 6, 4, 5)
WIDTH = 6


def _model(architecture: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = tiny_config(architecture, VOCAB, hidden_size=32, num_hidden_layers=2)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _hand_rollout(seed: int = 0) -> Rollout:
    generator = torch.Generator().manual_seed(seed)
    ordinary = len(SPECIAL_TOKENS)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(ordinary, VOCAB, (n,), generator=generator)

    width = max(PROMPT_LENGTHS)
    prompt_ids = torch.full((12, width), PAD)
    prompt_mask = torch.zeros(12, width, dtype=torch.bool)
    completion_ids = torch.full((12, WIDTH), PAD)
    completion_mask = torch.zeros(12, WIDTH, dtype=torch.bool)
    for group, length in enumerate(PROMPT_LENGTHS):
        prompt = tokens(length)
        for row in range(4 * group, 4 * group + 4):
            prompt_ids[row, width - length:] = prompt
            prompt_mask[row, width - length:] = True
            n = COMPLETION_LENGTHS[row]
            completion_ids[row, :n] = tokens(n)
            if n < WIDTH:
                completion_ids[row, n - 1] = EOS
            completion_mask[row, :n] = True
    examples = [ex for ex in Arithmetic().examples(3, seed=0) for _ in range(4)]
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, behavior_logp=torch.zeros(12, WIDTH),
                   examples=examples, completions=[""] * 12)


def _full_logp(model: Any, rollout: Rollout) -> torch.Tensor:
    logp = token_logprobs(completion_logits(model, rollout), rollout.completion_ids)
    return torch.where(rollout.completion_mask, logp, 0.0)


def _gradients(model: Any, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_shared_prefix_equals_the_full_forward_on_every_family(architecture: str) -> None:
    model = _model(architecture)
    rollout = _hand_rollout()
    weights = torch.randn(12, WIDTH, generator=torch.Generator().manual_seed(1))
    mask = rollout.completion_mask

    full = _full_logp(model, rollout)
    full_grads = _gradients(model, (weights * full)[mask].sum())
    shared_logits, count = shared_prefix_logits(model, rollout)
    shared = shared_logits.token_logprobs(rollout.completion_ids)
    shared_grads = _gradients(model, (weights * shared)[mask].sum())

    assert float((shared - full)[mask].abs().max().detach()) <= 1e-5
    assert torch.equal(shared[~mask], torch.zeros(int((~mask).sum())))
    # Every parameter gets a gradient on both paths; the measure is the largest absolute
    # difference of any entry, unscaled (entries reach about 15 here; measured differences
    # are about 2e-6).
    assert set(shared_grads) == set(full_grads)
    for name, grad in full_grads.items():
        assert float((shared_grads[name] - grad).abs().max()) <= 1e-5, name
    # prompts: 7, 5 and 3 tokens, each its own forward (one shared forward would pad 6 of 21
    # positions): 15. Completions need L − 1 = 5,5,5,5 | 4,4 | 3,3 | 2 | 1 columns (the two
    # 1-token rows need none). Bucket 1: four 5s take a 4 (1 padded ≤ 0.05·5·5 = 1.25) but not
    # the second 4 (2 > 0.05·6·5 = 1.5): 5 × 5 = 25; then 4; 3 × 2 = 6; 2; 1.
    # 15 + 25 + 4 + 6 + 2 + 1 = 53 positions, 1 padded
    assert count == PositionCount(positions=53, padding=1)


def test_one_forward_per_pass_for_sharded_policies_is_exact_too() -> None:
    model = _model("llama")
    rollout = _hand_rollout()
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        logits, count = shared_prefix_logits(model, rollout, single_forward=True)
    finally:
        hook.remove()
    assert len(calls) == 2  # one prompt forward, one completion forward
    mask = rollout.completion_mask
    shared = logits.token_logprobs(rollout.completion_ids)
    assert float((shared - _full_logp(model, rollout))[mask].abs().max().detach()) <= 1e-5
    # prompts: 3 × 7 positions, 21 − (7 + 5 + 3) = 6 padded; completions: 12 rows × 5 columns,
    # real Σ (L − 1) = 5+0+3+5+1+4+5+2+0+5+3+4 = 37, so 23 padded
    assert count == PositionCount(positions=21 + 60, padding=6 + 23)


def test_a_single_token_batch_still_runs_one_completion_position_when_sharded() -> None:
    model = _model("llama")
    rollout = _hand_rollout()
    one = replace(rollout, completion_ids=rollout.completion_ids[:, :1],
                  completion_mask=rollout.completion_mask[:, :1],
                  behavior_logp=rollout.behavior_logp[:, :1])
    logits, count = shared_prefix_logits(model, one, single_forward=True)
    logp = logits.token_logprobs(one.completion_ids)
    assert logp.shape == (12, 1)
    assert float((logp - _full_logp(model, one)).abs().max()) <= 1e-5
    # the completion forward's outputs are part of the graph (with zero gradient), so every
    # process's backward covers both forward calls
    logp.sum().backward()
    assert count == PositionCount(positions=21 + 12, padding=6 + 12)


def test_entropy_and_topk_match_the_full_forward() -> None:
    model = _model("qwen2")
    rollout = _hand_rollout()
    mask = rollout.completion_mask
    full = completion_logits(model, rollout) / 0.7
    shared, _ = shared_prefix_logits(model, rollout)
    shared = shared.scaled(0.7)
    topk = torch.randint(0, VOCAB, (12, WIDTH, 3), generator=torch.Generator().manual_seed(2))
    topk[..., 1] = -1  # an unused slot stays −inf in both
    entropy_diff = (shared.entropy() - token_entropy(full))[mask]
    assert float(entropy_diff.abs().max()) <= 1e-5
    expected, got = gather_logprobs(full, topk)[mask], shared.gather(topk)[mask]
    used = topk[mask] >= 0
    assert float((expected[used] - got[used]).abs().max()) <= 1e-5
    assert bool((got[~used] == float("-inf")).all())


# ------------------------------------------------------------------------------- buckets
def test_length_buckets_keep_padding_within_the_bound() -> None:
    lengths = [int(n) for n in torch.randint(1, 33, (200,),
                                             generator=torch.Generator().manual_seed(3))]
    buckets = length_buckets(lengths, max_padding=0.05)
    covered = sorted(r for b in buckets for r in b.rows)
    assert covered == [i for i, n in enumerate(lengths) if n >= 2]  # rows of 1 token run nothing
    for bucket in buckets:
        needs = [lengths[r] - 1 for r in bucket.rows]
        assert bucket.columns == max(needs)
        padded = sum(bucket.columns - need for need in needs)
        assert padded <= 0.05 * len(needs) * bucket.columns


def test_padding_buckets_by_hand() -> None:
    # needs 4, 4, 3, 2 at 10 %: {4, 4} → adding 3 pads 1 ≤ 0.1·3·4 = 1.2; adding 2 would pad
    # 1 + 2 = 3 > 0.1·4·4 = 1.6, so 2 starts a bucket of its own
    assert padding_buckets([4, 3, 4, 2], 0.1) == [Bucket((0, 2, 1), 4), Bucket((3,), 2)]
    assert padding_buckets([4, 3, 4, 2], 0.0) == [Bucket((0, 2), 4), Bucket((1,), 3),
                                                   Bucket((3,), 2)]
    with pytest.raises(ValueError, match=r"max_padding must be a finite number in \[0.0, 1.0\)"):
        padding_buckets([1], 1.0)


def test_the_quickstart_micro_batch_pads_at_most_five_per_cent() -> None:
    from trustregion.models.loading import TINY, load_model, prepare_tokenizer

    model, tokenizer = load_model(TINY)
    prepare_tokenizer(tokenizer, TINY, pad_token=None, chat_template=False)
    model.eval()
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, Arithmetic().examples(16, seed=0), group_size=8,
                               sampling=SamplingSettings(max_new_tokens=4))
    micro = rollout.select(torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64])
    with torch.no_grad():
        _, count = shared_prefix_logits(model, micro)
    full = micro.prompt_mask.numel() + micro.completion_mask.numel()
    real = int(micro.prompt_mask.sum() + micro.completion_mask.sum())
    assert (full - real) / full > 0.1  # the full forward's share of padding, for contrast
    assert count.padding_fraction <= 0.05
    assert count.positions < full / 2


def test_sharing_order_groups_rows_by_prompt_then_length() -> None:
    rollout = _hand_rollout()
    shuffled = rollout.select(torch.randperm(12, generator=torch.Generator().manual_seed(4)))
    keys = sharing_order(shuffled.prompt_ids, shuffled.prompt_mask, shuffled.completion_mask)
    ordered = shuffled.select(keys.sort(stable=True).indices)
    prompts = [tuple(row.tolist()) for row in ordered.prompt_ids]
    runs = [p for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1]]
    assert len(runs) == 3  # each prompt's 4 rows are adjacent
    lengths = ordered.lengths.tolist()
    for start in (0, 4, 8):
        assert lengths[start:start + 4] == sorted(lengths[start:start + 4])


# ------------------------------------------------------------------------------- fallbacks
class _NoCacheLlama(transformers.LlamaForCausalLM):
    """A causal LM whose forward takes no cache."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                position_ids: torch.Tensor, logits_to_keep: int = 0,
                use_cache: bool = False) -> Any:
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, logits_to_keep=logits_to_keep,
                               use_cache=False)


def _notes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    notes: list[str] = []
    monkeypatch.setattr(prefix_sharing, "rank_zero_info", notes.append)
    return notes


def test_a_forward_without_a_cache_falls_back_with_one_note(monkeypatch) -> None:
    notes = _notes(monkeypatch)
    torch.manual_seed(0)
    model = _NoCacheLlama(tiny_config("llama", VOCAB, hidden_size=32, num_hidden_layers=2)).eval()
    rollout = _hand_rollout()
    sharing = PrefixSharing()
    for _ in range(3):
        logits = sharing.logits(model, rollout, temperature=1.0, count=True)
        assert logits.dense
        logp = logits.token_logprobs(rollout.completion_ids)
        expected = token_logprobs(completion_logits(model, rollout), rollout.completion_ids)
        assert torch.equal(logp, expected)  # the full forward, exactly
    assert notes == ["prefix sharing is off for _NoCacheLlama: the forward of _NoCacheLlama "
                     "takes no cache (or past_key_values); its log-probs come from the full "
                     "forward (every prompt computed for each of its completions)"]
    # the full forward runs 12 × (7 + 6) = 156 positions; real: prompts 4·(7 + 5 + 3) = 60,
    # completions Σ L = 49, so 156 − 109 = 47 padded; three times
    assert sharing.counted == PositionCount(positions=3 * 156, padding=3 * 47)


def test_a_failing_check_falls_back_with_one_note(monkeypatch) -> None:
    notes = _notes(monkeypatch)
    model = _model("llama")
    rollout = _hand_rollout()
    sharing = PrefixSharing()

    def sharper(m: Any, r: Rollout) -> torch.Tensor:  # a full forward that is not the same
        return completion_logits(m, r) * 1.001

    for _ in range(3):
        logits = sharing.logits(model, rollout, full_forward=sharper)
        assert logits.dense
        expected = token_logprobs(sharper(model, rollout), rollout.completion_ids)
        assert torch.equal(logits.token_logprobs(rollout.completion_ids), expected)
    # logits × 1.001 differ by 0.001 of their scale, ten times the fp32 tolerance
    assert len(notes) == 1
    differ = (r"gives logits that differ from the full forward's by 0\.00(1|0999) of their "
              r"scale \(more than 0\.0001\) on a fixed check batch")
    assert re.fullmatch(rf"prefix sharing is off for LlamaForCausalLM: its packed forward "
                        rf"{differ}; its forward over a shared key/value cache {differ}; its "
                        r"log-probs come from the full forward \(every prompt computed for "
                        r"each of its completions\)", notes[0])


def test_switched_off_uses_the_full_forward_silently(monkeypatch) -> None:
    notes = _notes(monkeypatch)
    model = _model("llama")
    rollout = _hand_rollout()
    logits = PrefixSharing(enabled=False).logits(model, rollout, temperature=0.5)
    assert logits.dense
    expected = token_logprobs(completion_logits(model, rollout) / 0.5, rollout.completion_ids)
    assert torch.equal(logits.token_logprobs(rollout.completion_ids), expected)
    assert notes == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="enabled must be True or False"):
        PrefixSharing(enabled="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_padding must be a finite number in \[0.0, 1.0\)"):
        PrefixSharing(max_padding=-0.1)


# ------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("architecture", sorted(MOE_ARCHITECTURES))
def test_routing_replay_with_prefix_sharing_equals_the_full_replay(architecture: str) -> None:
    behavior = _model(architecture, seed=1)  # another model: its routing differs from the policy's
    policy = _model(architecture, seed=0)
    torch.manual_seed(5)
    rollout = generate_rollout(behavior, TOKENIZER, Arithmetic().examples(3, seed=0),
                               group_size=4, sampling=SamplingSettings(max_new_tokens=6),
                               record_routing=True)
    assert rollout.routing is not None
    mask = rollout.completion_mask
    assert prompt_routing_agrees(rollout.routing, rollout.prompt_ids, rollout.prompt_mask)
    with replaying_routing(policy, rollout.routing):
        expected = _full_logp(policy, rollout)
    shared, _ = shared_prefix_logits(policy, rollout, routing=rollout.routing)
    got = shared.token_logprobs(rollout.completion_ids)
    assert float((got - expected)[mask].abs().max()) <= 1e-5
    # and the replay changed something: the policy's own routing gives other log-probs
    own = _full_logp(policy, rollout)
    assert float((own - expected)[mask].abs().max()) > 1e-3


def test_rows_that_disagree_on_their_prompts_routing_use_the_full_forward(monkeypatch) -> None:
    notes = _notes(monkeypatch)
    policy = _model("qwen3_moe")
    rollout = _hand_rollout()
    routing, _ = own_routing(policy, rollout)
    routing = routing[:, :, :-1].clone()  # the record covers P + T − 1 positions
    routing[1, 0, 6] = (routing[1, 0, 6] + 1) % 8  # row 1 routes its prompt's last token apart
    assert not prompt_routing_agrees(routing, rollout.prompt_ids, rollout.prompt_mask)
    sharing = PrefixSharing()
    for _ in range(2):
        logits = sharing.logits(policy, rollout, routing=routing)
        assert logits.dense
    with replaying_routing(policy, routing):
        expected = token_logprobs(completion_logits(policy, rollout), rollout.completion_ids)
    assert torch.equal(logits.token_logprobs(rollout.completion_ids), expected)
    assert len(notes) == 1 and "recorded different expert choices" in notes[0]


# ------------------------------------------------------------------------------- the module
def _run(random_model_dir: Path, *, prefix_sharing: bool, steps: int = 4,
         **overrides: Any) -> tuple[TrustRegionModule, KeepSteps]:
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "task": DigitRichArithmetic(),
        "batching": BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=8,
                                  micro_batch_size=4),
        "sampling": SamplingSettings(max_new_tokens=5),
        "seed": 3,
        **overrides,
    }
    module = TrustRegionModule(policy=f"config:{random_model_dir}",
                               prefix_sharing=prefix_sharing, **settings)
    keeper = KeepSteps()
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              callbacks=[keeper]).fit(module)
    return module, keeper


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_the_module_trains_the_same_with_and_without_prefix_sharing(
        random_model_dir, aggregation) -> None:
    # micro-batches of 4 rows out of mini-batches of 8: with sharing the rows are also ordered
    # by prompt and length before the split; the loss uses the step's counts, so it is the same
    shared, shared_steps = _run(random_model_dir, prefix_sharing=True, aggregation=aggregation)
    full, full_steps = _run(random_model_dir, prefix_sharing=False, aggregation=aggregation)
    assert len(shared_steps.steps) == len(full_steps.steps) == 4
    for a, b in zip(shared_steps.steps, full_steps.steps, strict=True):
        assert torch.equal(a.rollout.completion_ids, b.rollout.completion_ids)
        assert abs(float(a.metrics["train/loss"]) - float(b.metrics["train/loss"])) <= 1e-5
    for (name, p), q in zip(shared.policy.named_parameters(), full.policy.parameters(),
                            strict=True):
        assert float((p - q).abs().max()) <= 1e-5, name
    assert shared.hparams["prefix_sharing"] is True and full.hparams["prefix_sharing"] is False
    # the counter: fewer positions with sharing, and at most 5 % of them padding
    assert 0 < shared.update_positions.positions < full.update_positions.positions
    assert shared.update_positions.padding_fraction <= 0.05


def test_the_module_refuses_a_non_boolean_prefix_sharing(random_model_dir) -> None:
    with pytest.raises(ValueError, match="prefix_sharing must be True or False"):
        TrustRegionModule(policy=f"config:{random_model_dir}",
                          prefix_sharing="no")  # type: ignore[arg-type]


def test_a_short_fit_with_sharing_replays_the_behaviours_routing(tmp_path, monkeypatch) -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_config("qwen3_moe", len(tokenizer), hidden_size=32, num_hidden_layers=2,
                intermediate_size=64).save_pretrained(tmp_path)
    torch.manual_seed(0)
    module = TrustRegionModule(
        policy=f"config:{tmp_path}", task=DigitRichArithmetic(),
        trust_region=RatioClip(anchor="old"),
        batching=BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4,
                               micro_batch_size=2),
        precision=PrecisionSettings(behavior="bf16"), sampling=SamplingSettings(max_new_tokens=5),
        routing_replay=True)
    own_differs: list[int] = []  # per forward: decisions where the policy's router disagrees
    used_differs: list[int] = []  # ... where the experts the forward used disagree
    original = replaying_routing

    @contextlib.contextmanager
    def watching(model: Any, routing: torch.Tensor) -> Any:
        assert model is module.policy  # never the reference
        with recording_routing(model, len(routing)) as own, original(model, routing), \
                recording_routing(model, len(routing)) as used:
            yield
        recorded = routing.long()
        for recorder, differs in ((own, own_differs), (used, used_differs)):
            chosen = recorder.routing()[:, :, :routing.shape[2]].long()
            differs.append(int((chosen != recorded).any(-1).sum()))

    monkeypatch.setattr(prefix_sharing, "replaying_routing", watching)
    monkeypatch.setattr(packing, "replaying_routing", watching)
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    # the shared forward ran (fewer positions than the full one's 8 rows × (P + T) per batch)
    # and replayed in every forward call: prompt passes and completion buckets
    assert module.update_positions.positions > 0
    assert len(used_differs) >= 16
    assert sum(own_differs) > 0  # the bf16 behaviour chose other experts somewhere ...
    assert used_differs == [0] * len(used_differs)  # ... and every forward went on with them


def test_a_sharded_policy_shares_the_cache_only_without_gradient(monkeypatch) -> None:
    # Where the packed forward does not apply, the shared-cache forward makes two forward
    # calls; under FSDP a second call with gradient would add a gradient exchange per step:
    # with gradient the full forward runs (noted once); without, one prompt and one completion
    # forward, the same on every process
    notes = _notes(monkeypatch)
    monkeypatch.setattr(prefix_sharing, "_is_sharded", lambda model: True)
    monkeypatch.setattr(prefix_sharing, "packed_logits", _unavailable)
    model = _model("llama")
    rollout = _hand_rollout()
    sharing = PrefixSharing()
    for _ in range(2):
        assert sharing.logits(model, rollout).dense
    assert sharing.method(model) == "cache"
    assert len(notes) == 2 and notes[0].startswith("the packed forward is off for "
                                                   "LlamaForCausalLM: its packed forward failed")
    assert notes[1].startswith("prefix sharing is off for the forward passes with gradient of "
                               "a sharded (FSDP)")
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            shared = sharing.logits(model, rollout)
    finally:
        hook.remove()
    assert not shared.dense and len(calls) == 2
    mask = rollout.completion_mask
    got = shared.token_logprobs(rollout.completion_ids)
    with torch.no_grad():
        assert float((got - _full_logp(model, rollout))[mask].abs().max()) <= 1e-5


def _unavailable(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("no packed attention mask here")


# ------------------------------------------------------------------------- packed forward
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_packed_forward_equals_the_full_forward_on_every_family(architecture: str) -> None:
    model = _model(architecture)
    rollout = _hand_rollout()
    weights = torch.randn(12, WIDTH, generator=torch.Generator().manual_seed(1))
    mask = rollout.completion_mask
    sharing = PrefixSharing(row_tokens=16)
    assert sharing.method(model) == "packed"

    full = _full_logp(model, rollout)
    full_grads = _gradients(model, (weights * full)[mask].sum())
    packed = sharing.logits(model, rollout, count=True).token_logprobs(rollout.completion_ids)
    packed_grads = _gradients(model, (weights * packed)[mask].sum())

    assert float((packed - full)[mask].abs().max().detach()) <= 1e-5
    assert torch.equal(packed[~mask], torch.zeros(int((~mask).sum())))
    assert set(packed_grads) == set(full_grads)
    for name, grad in full_grads.items():  # largest absolute difference, unscaled
        assert float((packed_grads[name] - grad).abs().max()) <= 1e-5, name
    # units: prompt + Σ (L − 1) of its rows: 7 + (5+0+3+5) = 20, 5 + (1+4+5+2) = 17,
    # 3 + (0+5+3+4) = 15; 52 real positions. Rows of max(20, 16) = 20: each unit its own
    # row, 3 × 20 = 60 positions, 8 padded
    assert sharing.counted == PositionCount(positions=60, padding=8)


def test_one_packed_row_holds_the_whole_micro_batch_by_default() -> None:
    model = _model("llama")
    rollout = _hand_rollout()
    sharing = PrefixSharing()
    assert sharing.method(model) == "packed"  # the one-time check runs its own forwards
    calls: list[tuple[int, ...]] = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        sharing.logits(model, rollout, count=True)
    finally:
        hook.remove()
    # 52 real positions fit one row of 256: one forward call, no padding
    assert calls == [(1, 52)]
    assert sharing.counted == PositionCount(positions=52, padding=0)


def test_pack_units_by_hand() -> None:
    # capacity max(9, 8) = 9; decreasing: 9 → row 0; 6 → row 1; 3 → row 1 at 6 (6 + 3 ≤ 9):
    # 2 × 9 slots for 18 positions, no padding, so no larger capacity is tried
    assert pack_units([3, 9, 6], row_tokens=8) == ([1, 0, 1], [6, 0, 0], 9)
    # capacity 10: 5 5 | 4 1, 20 slots for 15 positions; capacities up to 20 are tried and 15
    # holds 5 5 4 1 in one row (offsets 0, 10, 5, 14) with no padding
    assert pack_units([5, 4, 5, 1], row_tokens=10) == ([0, 0, 0, 0], [0, 10, 5, 14], 15)
    # units of 20, 17 and 15 (the hand rollout's) in rows of at least 16: three rows of 20
    # (60 slots) beat every two-row packing up to capacity 40 (e.g. 20 | 17 15: 2 × 32 = 64)
    assert pack_units([20, 17, 15], row_tokens=16) == ([0, 1, 2], [0, 0, 0], 20)
    with pytest.raises(ValueError, match="row_tokens must be an integer ≥ 1"):
        pack_units([3], row_tokens=0)


def test_the_tree_mask_by_hand() -> None:
    # one prompt of 2 tokens with completions of 3 tokens (row 0) and 2 tokens (row 1):
    rollout = Rollout(
        prompt_ids=torch.tensor([[10, 11], [10, 11]]),
        prompt_mask=torch.ones(2, 2, dtype=torch.bool),
        completion_ids=torch.tensor([[12, 13, 14], [15, 16, 0]]),
        completion_mask=torch.tensor([[True, True, True], [True, True, False]]),
        behavior_logp=torch.zeros(2, 3), examples=[], completions=[])
    first, inverse = distinct_prompts(rollout.prompt_ids, rollout.prompt_mask)
    layout = packed_layout(rollout, first, inverse, row_tokens=6)
    # the unit: prompt 10 11, row 0 feeds 12 13 (3 tokens), row 1 feeds 15 (2 tokens)
    assert layout.input_ids.tolist() == [[10, 11, 12, 13, 15]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    # token 0 of both rows is predicted by slot 1 (the prompt's last token)
    assert layout.target_rows.tolist() == [0, 0, 0, 1, 1]
    assert layout.target_columns.tolist() == [0, 1, 2, 0, 1]
    assert layout.predictor.tolist() == [1, 2, 3, 1, 4]
    allowed = tree_attention_mask(layout, dtype=torch.float32)[0, 0] == 0
    assert allowed.int().tolist() == [[1, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0],
                                      [1, 1, 1, 0, 0],
                                      [1, 1, 1, 1, 0],
                                      [1, 1, 0, 0, 1]]  # 15 sees the prompt, not 12 13
    window = tree_attention_mask(layout, dtype=torch.float32, sliding_window=2)[0, 0] == 0
    # position difference < 2: 13 (pos 3) no longer sees 11 (pos 1) nor 10
    assert window[3].int().tolist() == [0, 0, 1, 1, 0]


@pytest.mark.parametrize("architecture", sorted(MOE_ARCHITECTURES))
def test_the_packed_forward_replays_routing_like_the_full_forward(architecture: str) -> None:
    behavior = _model(architecture, seed=1)
    policy = _model(architecture, seed=0)
    torch.manual_seed(5)
    rollout = generate_rollout(behavior, TOKENIZER, Arithmetic().examples(3, seed=0),
                               group_size=4, sampling=SamplingSettings(max_new_tokens=6),
                               record_routing=True)
    assert rollout.routing is not None
    mask = rollout.completion_mask
    with replaying_routing(policy, rollout.routing):
        expected = _full_logp(policy, rollout)
    sharing = PrefixSharing()
    assert sharing.method(policy) == "packed"
    got = sharing.logits(policy, rollout, routing=rollout.routing).token_logprobs(
        rollout.completion_ids)
    assert float((got - expected)[mask].abs().max()) <= 1e-5
    own = _full_logp(policy, rollout)
    assert float((own - expected)[mask].abs().max()) > 1e-3


def test_a_sharded_policy_runs_the_packed_forward_once_with_gradient(monkeypatch) -> None:
    monkeypatch.setattr(prefix_sharing, "_is_sharded", lambda model: True)
    model = _model("llama")
    rollout = _hand_rollout()
    sharing = PrefixSharing()
    sharing.method(model)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        logits = sharing.logits(model, rollout)
    finally:
        hook.remove()
    assert not logits.dense and len(calls) == 1
    got = logits.token_logprobs(rollout.completion_ids)
    mask = rollout.completion_mask
    assert float((got - _full_logp(model, rollout))[mask].abs().max().detach()) <= 1e-5


def test_mixed_window_layers_fall_back_to_the_shared_cache() -> None:
    config = tiny_config("qwen2", VOCAB, hidden_size=32, num_hidden_layers=2,
                         use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention"])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="mixes sliding-window and full attention layers"):
        sliding_window_of(model)
    sharing = PrefixSharing()
    assert sharing.method(model) == "cache"
    rollout = _hand_rollout()  # sequences of up to 13 tokens: longer than the window of 4
    got = sharing.logits(model, rollout).token_logprobs(rollout.completion_ids)
    mask = rollout.completion_mask
    assert float((got - _full_logp(model, rollout))[mask].abs().max().detach()) <= 1e-5


def test_a_pickled_copy_decides_again_for_its_own_models() -> None:
    # modules are pickled to start processes; the decisions are keyed by live models
    model = _model("llama")
    sharing = PrefixSharing(row_tokens=16)
    assert sharing.method(model) == "packed"
    copy = pickle.loads(pickle.dumps(sharing))
    assert copy.row_tokens == 16 and copy.counted == sharing.counted
    assert copy.method(pickle.loads(pickle.dumps(model))) == "packed"


def test_a_micro_batch_with_long_units_runs_the_shared_cache_forward() -> None:
    # the hand rollout's longest unit takes 7 + (5 + 0 + 3 + 5) = 20 positions: above a limit
    # of 19 it runs the shared-cache forward (the packed one stays checked and chosen)
    model = _model("llama")
    rollout = _hand_rollout()
    sharing = PrefixSharing(max_unit_tokens=19)
    assert sharing.method(model) == "packed"
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        sharing.logits(model, rollout, count=True)  # first use also checks the cache path
        calls.clear()
        got = sharing.logits(model, rollout).token_logprobs(rollout.completion_ids)
    finally:
        hook.remove()
    # 3 prompt forwards (lengths 7, 5, 3) and 5 completion buckets (see the every-family test)
    assert len(calls) == 8
    assert sharing.counted == PositionCount(positions=53, padding=1)
    mask = rollout.completion_mask
    assert float((got - _full_logp(model, rollout))[mask].abs().max().detach()) <= 1e-5
    assert PrefixSharing(max_unit_tokens=20).logits(model, rollout).pieces[0].columns is not None
