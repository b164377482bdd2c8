"""Routing replay: the behaviour's expert choices recorded during generation and replayed in the
policy's forward passes (trustregion.routing)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import transformers
from conftest import DigitRichArithmetic
from step_keeper import KeepSteps

from trustregion.batching import BatchSettings
from trustregion.models import build_char_tokenizer
from trustregion.models.architectures import tiny_config
from trustregion.module import TrustRegionModule
from trustregion.precision import PrecisionSettings, low_precision_copy
from trustregion.resume import defines_the_run, run_defining_differences
from trustregion.rollout import Rollout, SamplingSettings, completion_logits, generate_rollout
from trustregion.routing import (
    check_routing_replay,
    moe_routers,
    own_routing,
    recording_routing,
    replaying_routing,
    rollout_drift,
    routed_positions,
    routing_agreement,
    routing_bytes_per_token,
)
from trustregion.strategies import RatioClip
from trustregion.tasks import Arithmetic

MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe")


def _tokenizer() -> Any:
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def _model(architecture: str, seed: int = 0, **size: Any) -> Any:
    torch.manual_seed(seed)
    config = tiny_config(architecture, len(_tokenizer()), **size)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _rollout(behavior: Any, *, seed: int = 0, prompts: int = 3, group_size: int = 2,
             max_new_tokens: int = 8) -> Rollout:
    # arithmetic prompts of different lengths: left padding; EOS ends some completions early
    torch.manual_seed(100 + seed)
    return generate_rollout(behavior, _tokenizer(), Arithmetic().examples(prompts, seed=seed),
                            group_size=group_size,
                            sampling=SamplingSettings(max_new_tokens=max_new_tokens),
                            record_routing=True)


def _logp(model: Any, rollout: Rollout) -> torch.Tensor:
    logits = completion_logits(model, rollout)
    return logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]


# ------------------------------------------------------------------------------- recording
def test_the_record_covers_the_prompt_and_every_fed_completion_position() -> None:
    model = _model("qwen3_moe", num_hidden_layers=2)
    rollout = _rollout(model)
    assert rollout.routing is not None
    rows, prompt, completion = len(rollout), rollout.prompt_ids.shape[1], \
        rollout.completion_ids.shape[1]
    # 2 layers, top-2 of 8 experts; the last sampled token is never fed back: P + T − 1
    assert tuple(rollout.routing.shape) == (rows, 2, prompt + completion - 1, 2)
    assert rollout.routing.dtype == torch.int8
    assert int(rollout.routing.min()) >= 0 and int(rollout.routing.max()) <= 7


def test_bytes_per_token_are_layers_times_top_k_times_the_index_size() -> None:
    # qwen3_moe: 3 layers × top-2 × 1 byte (int8 holds 8 expert indices) = 6
    assert routing_bytes_per_token(_model("qwen3_moe")) == 6
    # mixtral: 3 layers × top-2 × 1 byte (4 experts) = 6
    assert routing_bytes_per_token(_model("mixtral")) == 6


@pytest.mark.parametrize("architecture", MOE_FAMILIES)
def test_fp32_replay_changes_nothing_and_the_record_is_the_policys_own_routing(
        architecture: str) -> None:
    policy = _model(architecture, num_hidden_layers=2)
    rollout = _rollout(low_precision_copy(policy, "fp32"))
    assert rollout.routing is not None
    with torch.no_grad():
        own, _ = own_routing(policy, rollout)
        plain = _logp(policy, rollout)
        with replaying_routing(policy, rollout.routing):
            replayed = _logp(policy, rollout)
    positions = routed_positions(rollout.prompt_mask, rollout.completion_mask)
    assert float(routing_agreement(rollout.routing, own, positions)) == 1.0
    mask = rollout.completion_mask
    assert float((replayed - plain)[mask].abs().max()) <= 1e-6


@pytest.mark.parametrize("architecture", MOE_FAMILIES)
def test_replayed_experts_replace_the_policys_choice_except_at_the_last_position(
        architecture: str) -> None:
    policy = _model(architecture, num_hidden_layers=2)
    rollout = _rollout(policy)
    assert rollout.routing is not None
    forced = torch.zeros_like(rollout.routing)
    forced[..., 1] = 1  # experts {0, 1} everywhere, whatever the router prefers
    with torch.no_grad():
        own, _ = own_routing(policy, rollout)
        with replaying_routing(policy, forced):
            used, _ = own_routing(policy, rollout)
    recorded = forced.shape[2]
    assert torch.equal(used[:, :, :recorded], forced.long())
    # the first layer's input at the last position is the same either way; deeper layers see
    # the forced experts' outputs through attention, so only the first layer is compared
    assert torch.equal(used[:, 0, recorded:], own[:, 0, recorded:])
    assert used.shape[2] == recorded + 1


def test_replayed_gates_are_the_routers_softmax_over_the_replayed_experts() -> None:
    # one router, a hand-made forward: logits [0, ln 3, 0, 0, ...] over 8 experts.
    policy = _model("qwen3_moe", num_hidden_layers=1)
    (router,) = moe_routers(policy)
    logits = torch.zeros(1, 8)
    logits[0, 1] = torch.log(torch.tensor(3.0))
    replay = torch.tensor([[[[1, 2]]]])  # [rows 1, layers 1, positions 1, top-2]
    handle = router.register_forward_hook(lambda module, args, output: (logits, *output[1:]))
    try:
        with replaying_routing(policy, replay):
            _, gates, experts = router(torch.zeros(1, router.hidden_dim))
    finally:
        handle.remove()
    # softmax: expert 1 has 3/10, expert 2 has 1/10; renormalised (norm_topk_prob): 3/4, 1/4
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(gates, torch.tensor([[0.75, 0.25]]))


# ---------------------------------------------------------------------------- bf16 drift
def test_replay_removes_the_routing_flips_of_a_bf16_behaviour_and_reduces_drift() -> None:
    policy = _model("qwen3_moe", seed=0)
    rollout = _rollout(low_precision_copy(policy, "bf16"), prompts=8, group_size=4,
                       max_new_tokens=16)
    assert rollout.routing is not None
    plain = rollout_drift(policy, rollout)
    replayed = rollout_drift(policy, rollout, replay=True)
    with torch.no_grad(), replaying_routing(policy, rollout.routing):
        used, _ = own_routing(policy, rollout)
    # every recorded position (padding included) takes the behaviour's experts
    assert torch.equal(used[:, :, :rollout.routing.shape[2]], rollout.routing.long())
    assert replayed.routing_agreement == 1.0
    # measured on this seed: 0.99 of (token, layer) decisions agree without replay (1 % flip);
    # k3 2.16e-6 → 1.39e-6 and max |log r| 0.0105 → 0.0051 with replay
    assert plain.routing_agreement is not None and 0.95 < plain.routing_agreement < 1.0
    assert replayed.kl_k3 < 0.8 * plain.kl_k3
    assert replayed.max_abs_log_ratio < 0.7 * plain.max_abs_log_ratio
    assert replayed.abs_log_ratio < plain.abs_log_ratio


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("architecture", MOE_FAMILIES)
def test_gradients_reach_every_router_under_replay(architecture: str) -> None:
    policy = _model(architecture, num_hidden_layers=2).train()
    rollout = _rollout(policy)
    assert rollout.routing is not None
    with replaying_routing(policy, rollout.routing):
        logp = _logp(policy, rollout)
    logp[rollout.completion_mask].sum().backward()
    for router in moe_routers(policy):
        assert router.weight.grad is not None
        assert float(router.weight.grad.abs().sum()) > 0


def test_micro_batches_replay_the_rows_they_hold() -> None:
    policy = _model("qwen3_moe", num_hidden_layers=2)
    rollout = _rollout(low_precision_copy(policy, "bf16"))
    assert rollout.routing is not None
    with torch.no_grad():
        with replaying_routing(policy, rollout.routing):
            whole = _logp(policy, rollout)
        parts = []
        for index in torch.arange(len(rollout)).split(4):  # 6 rows: micro-batches of 4 and 2
            part = rollout.select(index)
            assert part.routing is not None
            with replaying_routing(policy, part.routing):
                parts.append(_logp(policy, part))
    mask = rollout.completion_mask
    loss_whole = whole[mask].sum()
    loss_parts = torch.cat(parts)[mask].sum()
    torch.testing.assert_close(torch.cat(parts)[mask], whole[mask], atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_parts, loss_whole, atol=1e-5, rtol=0)


def test_select_slices_the_routing_by_row() -> None:
    rollout = _rollout(_model("qwen3_moe", num_hidden_layers=2))
    assert rollout.routing is not None
    part = rollout.select(torch.tensor([4, 1]))
    assert part.routing is not None
    assert torch.equal(part.routing, rollout.routing[[4, 1]])


# ---------------------------------------------------------------------------- refusals
def test_a_dense_model_is_refused_naming_the_supported_families() -> None:
    dense = _model("qwen3", num_hidden_layers=1)
    with pytest.raises(ValueError, match="Supported families: qwen3_moe, mixtral, olmoe"):
        check_routing_replay(dense)
    with pytest.raises(ValueError, match="has none"):
        _rollout(dense)


def test_replaying_a_record_of_another_model_is_refused() -> None:
    policy = _model("qwen3_moe", num_hidden_layers=2)
    record = torch.zeros(6, 3, 10, 2, dtype=torch.int8)  # 3 layers for a 2-layer model
    with pytest.raises(ValueError, match=r"routing must be \[rows, 2 layers, positions, top_k\]"), \
            replaying_routing(policy, record):
        pass


def test_replaying_a_record_of_other_rows_is_refused() -> None:
    policy = _model("qwen3_moe", num_hidden_layers=2)
    rollout = _rollout(policy)  # 3 prompts × 2 completions = 6 rows
    assert rollout.routing is not None and len(rollout) == 6
    recorded = rollout.routing.shape[2]
    # the first 3 rows' record for all 6 rows: 6 rows × (recorded + 1) positions would reshape
    # into 3 rows of 2·(recorded + 1) positions, so it must be refused, not replayed
    with pytest.raises(ValueError, match=rf"holds 3 rows of {recorded} positions of top-2 "
                                         rf"choices, but the router chose 2 experts for "
                                         rf"{6 * (recorded + 1)} tokens; a replayed forward "
                                         rf"must run over the same 3 rows"), \
            torch.no_grad(), replaying_routing(policy, rollout.routing[:3]):
        completion_logits(policy, rollout)


def test_replaying_a_record_of_other_lengths_is_refused() -> None:
    policy = _model("qwen3_moe", num_hidden_layers=2)
    rollout = _rollout(policy)
    assert rollout.routing is not None
    recorded = rollout.routing.shape[2]
    # two positions short: the forward holds recorded + 1 positions per row, the record
    # recorded − 2, neither equal nor one short
    with pytest.raises(ValueError, match=rf"6 rows of {recorded - 2} positions .* with "
                                         rf"{recorded - 2} or {recorded - 1} positions each"), \
            torch.no_grad(), replaying_routing(policy, rollout.routing[:, :, :-2]):
        completion_logits(policy, rollout)


# ------------------------------------------------------------------------------ module
BATCHING = BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4,
                         micro_batch_size=2)


def _save(tmp_path: Path, architecture: str) -> str:
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_config(architecture, len(tokenizer), hidden_size=32, num_hidden_layers=2,
                intermediate_size=64).save_pretrained(tmp_path)
    return f"config:{tmp_path}"


def test_the_module_refuses_routing_replay_on_a_dense_policy(tmp_path) -> None:
    with pytest.raises(ValueError, match="routing_replay needs a mixture-of-experts model"):
        TrustRegionModule(policy=_save(tmp_path, "llama"), routing_replay=True)
    with pytest.raises(ValueError, match="routing_replay must be True or False"):
        TrustRegionModule(policy=_save(tmp_path, "qwen3_moe"), routing_replay=1)  # type: ignore[arg-type]




def test_a_short_fit_replays_the_behaviours_routing(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    # the full forward (its shared-prefix twin is in test_prefix_sharing.py)
    module = TrustRegionModule(policy=_save(tmp_path, "qwen3_moe"), task=DigitRichArithmetic(),
                               trust_region=RatioClip(anchor="old"), batching=BATCHING,
                               precision=PrecisionSettings(behavior="bf16"),
                               sampling=SamplingSettings(max_new_tokens=5), routing_replay=True,
                               prefix_sharing=False)
    rows: list[int] = []
    own_differs: list[int] = []  # per forward: decisions where the policy's router disagrees
    used_differs: list[int] = []  # ... where the experts the forward used disagree
    original = replaying_routing

    @contextlib.contextmanager
    def watching(model, routing):
        assert model is module.policy  # never the reference
        rows.append(len(routing))
        # hooks run in the order they were registered: the first recorder sees the router's
        # own choice, the last the experts the forward went on with
        with recording_routing(model, len(routing)) as own, original(model, routing), \
                recording_routing(model, len(routing)) as used:
            yield
        recorded = routing.long().sort(-1).values
        for recorder, differs in ((own, own_differs), (used, used_differs)):
            chosen = recorder.routing()[:, :, :routing.shape[2]].long().sort(-1).values
            differs.append(int((chosen != recorded).any(-1).sum()))

    monkeypatch.setattr("trustregion.prefix_sharing.replaying_routing", watching)
    routers = moe_routers(module.policy)
    before = [r.weight.detach().clone() for r in routers]
    keep = KeepSteps()
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[keep]).fit(module)
    assert module.hparams["routing_replay"] is True
    # 2 rollout batches of 8 rows: old log-probs in 4 micro-batches of 2, and 2 optimiser steps
    # of 2 micro-batches of 2 each → 8 replayed forwards of 2 rows per batch
    assert rows == [2] * 16
    # the bf16 behaviour chose other experts than the fp32 policy's router somewhere (measured
    # on this seed: 10 of 672 (row, layer, position) decisions over the 16 forwards) ...
    assert sum(own_differs) > 0
    # ... and every forward went on with the behaviour's experts at every recorded position
    assert used_differs == [0] * 16
    for step in keep.steps:
        routing = step.rollout.routing
        assert routing is not None and routing.dtype == torch.int8
        assert tuple(routing.shape[:2]) == (8, 2) and routing.shape[3] == 2
    assert all(not torch.equal(b, r.weight) for b, r in zip(before, routers, strict=True))


def test_routing_replay_may_change_on_resume() -> None:
    # it keeps no state: the next rollout records or not, the next forward replays or not
    assert defines_the_run("model.routing_replay") is False
    assert run_defining_differences({"routing_replay": False, "sync_every": 1},
                                    {"routing_replay": True, "sync_every": 1}) == []
