from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from step_keeper import KeepSteps
from transformers import AutoTokenizer

from trustregion.batching import BatchSettings
from trustregion.module import TrustRegionModule
from trustregion.optim import AdamW, LinearWarmup
from trustregion.penalties import EntropyBonus, Penalty, PenaltyOutput, ReferenceKL
from trustregion.rollout import SamplingSettings
from trustregion.strategies import SHARED_METRICS, DivergenceMask, RatioClip, TokenBatch
from trustregion.tasks import JsonlTask

# 2 prompts × 4 completions = 8 sequences per rollout batch; mini-batches of 4 → 2 optimiser
# steps per rollout batch (per PPO epoch).
BATCHING = BatchSettings(group_size=4, prompts_per_step=2, mini_batch_size=4,
                         micro_batch_size=2)
SAMPLING = SamplingSettings(max_new_tokens=5)
SMALL = {"batching": BATCHING, "sampling": SAMPLING}


def _batching(**changes: Any) -> BatchSettings:
    return replace(BATCHING, **changes)


def _sampling(**changes: Any) -> SamplingSettings:
    return replace(SAMPLING, **changes)


def _adamw(lr: float) -> Any:
    """The default optimiser at learning rate ``lr``, as a config's ``init_args`` give it."""
    return partial(AdamW, lr=lr)


def _module(random_model_dir: Path, **overrides) -> TrustRegionModule:
    torch.manual_seed(0)
    overrides.setdefault("task", DigitRichArithmetic())
    return TrustRegionModule(policy=f"config:{random_model_dir}", **{**SMALL, **overrides})




def _fit(module: TrustRegionModule, steps: int, ckpt_path: str | None = None,
         **trainer) -> L.Trainer:
    trainer.setdefault("logger", False)
    trainer.setdefault("enable_checkpointing", False)
    trainer.setdefault("log_every_n_steps", 1)
    t = L.Trainer(max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                  **trainer)
    t.fit(module, ckpt_path=ckpt_path)
    return t


def test_logged_metric_keys(random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir,
                     penalties=[ReferenceKL(beta=0.01), EntropyBonus(coef=0.001)])
    keep = KeepSteps()
    trainer = _fit(module, steps=4, logger=CSVLogger(tmp_path, name="run", version=0),
                   callbacks=[keep])
    expected = {
        "reward/mean", "reward/std", "reward/frac_zero_std", "response/length_mean",
        "response/length_max", "train/lr", "train/loss", "train/grad_norm",
        "train/skipped_steps", "penalty/ref_kl", "penalty/entropy", "trust_region/penalty_mean",
        *(f"trust_region/{k}" for k in SHARED_METRICS),
    }
    assert set(trainer.progress_bar_metrics) == {"reward", "loss"}
    assert expected <= set(trainer.callback_metrics)
    rows = _metrics_by_step(tmp_path / "run" / "version_0" / "metrics.csv")
    assert sorted(rows) == [0, 1]  # one row per rollout batch (2 optimiser steps each)
    for row in rows.values():  # exactly the module's keys, in every row
        assert {key for key, value in row.items() if value} == expected | {"step", "epoch"}
    # the StepOutput callbacks read holds the same values as the logger row
    assert len(keep.steps) == 2
    for index, step in enumerate(keep.steps):
        assert set(step.metrics) == expected
        for key, value in step.metrics.items():
            assert float(rows[index][key]) == pytest.approx(float(value), rel=1e-6), key


def test_two_rollout_batches_make_the_expected_number_of_optimiser_steps(random_model_dir):
    # 2 prompts × 4 completions = 8 sequences; mini-batches of 4 → 2 steps per epoch; 2 epochs.
    module = _module(random_model_dir, batching=_batching(ppo_epochs=2))
    assert module.optimizer_steps_per_rollout == 4
    trainer = _fit(module, steps=8)
    assert trainer.global_step == 8
    assert module.next_prompt_batch == 2


@pytest.mark.parametrize(("sync_every", "in_sync"), [(1, True), (3, False), (4, True)])
def test_behavior_is_synced_every_n_optimizer_steps(random_model_dir, sync_every, in_sync):
    module = _module(random_model_dir, sync_every=sync_every, optimizer=_adamw(1e-2))
    _fit(module, steps=4)
    same = all(torch.equal(a, b) for a, b in zip(module.policy.state_dict().values(),
                                                  module.behavior.state_dict().values(),
                                                  strict=True))
    assert same is in_sync
    assert module.steps_since_sync == 4 % sync_every


def test_old_logp_is_recomputed_only_for_old_anchors(random_model_dir, monkeypatch) -> None:
    for anchor, expected_calls in (("behavior", 0), ("old", 2)):
        module = _module(random_model_dir, trust_region=RatioClip(anchor=anchor))
        calls: list[object] = []

        def counting(model, rollout, calls=calls, original=module._completion_logp):
            calls.append(model)
            return original(model, rollout)

        monkeypatch.setattr(module, "_completion_logp", counting)
        _fit(module, steps=4)  # 2 rollout batches of 2 optimiser steps each
        assert len(calls) == expected_calls


def test_topk_strategy_gets_topk_data(random_model_dir) -> None:
    module = _module(random_model_dir,
                     trust_region=DivergenceMask(divergence="topk_kl", divergence_top_k=3))
    keep = KeepSteps()
    _fit(module, steps=1, callbacks=[keep])
    record = keep.steps[0].updates[0]
    assert record.batch.topk_logp is not None and record.batch.topk_logp.shape[-1] == 4


def _metrics_by_step(path: Path) -> dict[int, dict[str, str]]:
    with open(path) as handle:
        return {int(row["step"]): row for row in csv.DictReader(handle)}


def test_resumed_run_logs_the_same_metrics(random_model_dir, tmp_path) -> None:
    # 3 rollout batches of 4 optimiser steps each (2 epochs × 2 mini-batches); the behaviour
    # model syncs every 3 steps, so the checkpoint at step 4 falls between two syncs.
    kwargs = {"sync_every": 3, "batching": _batching(ppo_epochs=2), "optimizer": _adamw(5e-3)}
    full = _module(random_model_dir, **kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                  save_top_k=-1, filename="{step}")
    _fit(full, steps=12, logger=CSVLogger(tmp_path, name="full", version=0),
         callbacks=[checkpoints], enable_checkpointing=True)

    resumed = _module(random_model_dir, **kwargs)
    _fit(resumed, steps=12, logger=CSVLogger(tmp_path, name="resumed", version=0),
         ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))

    expected = _metrics_by_step(tmp_path / "full" / "version_0" / "metrics.csv")
    got = _metrics_by_step(tmp_path / "resumed" / "version_0" / "metrics.csv")
    assert sorted(expected) == [0, 1, 2] and sorted(got) == [1, 2]
    assert float(expected[2]["train/grad_norm"]) > 0  # the run really learns something
    for step in (1, 2):
        assert got[step].keys() == expected[step].keys()
        for key, value in expected[step].items():
            assert float(got[step][key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), \
                (step, key)
    assert resumed.next_prompt_batch == full.next_prompt_batch == 3
    assert resumed.steps_since_sync == full.steps_since_sync
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(full.behavior.parameters(), resumed.behavior.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_checkpoint_holds_models_strategy_and_positions(random_model_dir, tmp_path) -> None:
    module = _module(random_model_dir, trust_region=RatioClip(epsilon_high=0.28), sync_every=3,
                     penalties=[ReferenceKL(beta=0.01)])
    trainer = _fit(module, steps=2)
    module.trust_region.scale_width(0.5)  # as an adaptive controller would
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    prefixes = {key.split(".")[0] for key in ckpt["state_dict"]}
    assert prefixes == {"policy", "behavior", "reference"}
    assert ckpt["trustregion"]["strategy_state"]["epsilon_high"] == pytest.approx(0.14)
    assert ckpt["trustregion"]["steps_since_sync"] == 2
    assert ckpt["trustregion"]["next_prompt_batch"] == 1
    assert len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1

    restored = _module(random_model_dir, trust_region=RatioClip(epsilon_high=0.28),
                       penalties=[ReferenceKL(beta=0.01)])
    restored.on_load_checkpoint(ckpt)
    assert restored.trust_region.epsilon_high == pytest.approx(0.14)
    other = _module(random_model_dir, trust_region=DivergenceMask())
    with pytest.raises(ValueError, match=r"trained with trustregion\.strategies\.ratio_clip"):
        other.on_load_checkpoint(ckpt)


@pytest.mark.parametrize(("overrides", "message"), [
    # batching: counts are integers ≥ 1, groups hold at least two completions
    pytest.param(lambda: {"batching": _batching(group_size=1)},
                 "group_size must be ≥ 2: the advantage estimators compare", id="group_size"),
    pytest.param(lambda: {"batching": _batching(mini_batch_size=0)},
                 "mini_batch_size must be an integer ≥ 1; got 0", id="mini_batch_size"),
    pytest.param(lambda: {"batching": _batching(micro_batch_size=0)},
                 r"micro_batch_size must be an integer ≥ 1 \(None: the whole per-process "
                 r"mini-batch\); got 0", id="micro_batch_size"),
    pytest.param(lambda: {"batching": _batching(ppo_epochs=1.5)},
                 "ppo_epochs must be an integer ≥ 1; got 1.5", id="ppo_epochs"),
    pytest.param(lambda: {"batching": {"group_size": 4}},
                 "batching must be a BatchSettings; got dict", id="batching-dict"),
    # sampling: each setting says its range and how to turn it off
    pytest.param(lambda: {"sampling": _sampling(temperature=-1.0)},
                 r"temperature must be a finite number in \(0.0, inf\); got -1.0",
                 id="temperature"),
    pytest.param(lambda: {"sampling": _sampling(temperature=math.inf)},
                 r"temperature must be a finite number in \(0.0, inf\); got inf",
                 id="temperature-inf"),
    pytest.param(lambda: {"sampling": _sampling(top_p=1.5)},
                 r"top_p must be a finite number in \(0.0, 1.0\] \(1 turns it off\); got 1.5",
                 id="top_p"),
    pytest.param(lambda: {"sampling": _sampling(top_k=-1)},
                 r"top_k must be an integer ≥ 0 \(0 turns it off\); got -1", id="top_k"),
    pytest.param(lambda: {"sampling": _sampling(max_new_tokens=0)},
                 "max_new_tokens must be an integer ≥ 1; got 0", id="max_new_tokens"),
    pytest.param(lambda: {"sampling": {"temperature": 0.7}},
                 "sampling must be a SamplingSettings; got dict", id="sampling-dict"),
    # penalties
    pytest.param(lambda: {"penalties": [ReferenceKL(beta=-1.0)]},
                 "ReferenceKL beta must be a finite number ≥ 0; got -1.0", id="kl-beta"),
    pytest.param(lambda: {"penalties": [ReferenceKL(estimator="k5")]},
                 r"unknown KL estimator 'k5'; allowed: \('k1', 'k2', 'k3'\)", id="kl-estimator"),
    pytest.param(lambda: {"penalties": [EntropyBonus(coef=-0.1)]},
                 "EntropyBonus coef must be a finite number ≥ 0; got -0.1", id="entropy-coef"),
    pytest.param(lambda: {"penalties": ["kl"]},
                 "every penalty must be a trustregion.penalties.Penalty; got str", id="penalty"),
    # optimiser and schedule: built once on the policy's parameters at construction
    pytest.param(lambda: {"optimizer": _adamw(0.0)},
                 "the optimizer's learning rate must be a finite number > 0; got 0.0",
                 id="lr-zero"),
    pytest.param(lambda: {"optimizer": _adamw(math.inf)},
                 "the optimizer's learning rate must be a finite number > 0; got inf",
                 id="lr-inf"),
    pytest.param(lambda: {"optimizer": partial(torch.optim.AdamW, lr=-1.0)},
                 "the optimizer could not be built on the policy's parameters: "
                 "Invalid learning rate: -1.0", id="lr-negative"),
    pytest.param(lambda: {"optimizer": partial(torch.optim.SGD, lr=0.1, momentum=-0.5)},
                 "the optimizer could not be built on the policy's parameters: "
                 "Invalid momentum value: -0.5", id="momentum"),
    pytest.param(lambda: {"optimizer": partial(torch.optim.SGD, lr=0.1, nesterov_momentum=0.9)},
                 "the optimizer could not be built on the policy's parameters: .*"
                 "nesterov_momentum", id="unknown-optimizer-argument"),
    pytest.param(lambda: {"lr_scheduler": partial(LinearWarmup, warmup_steps=-1)},
                 r"the lr_scheduler could not be built: warmup_steps must be an integer ≥ 0 "
                 r"\(0: no warm-up\); got -1", id="warmup_steps"),
    # the rest of the module's own settings
    pytest.param(lambda: {"aggregation": "mean"}, "unknown aggregation mode 'mean'",
                 id="aggregation"),
    pytest.param(lambda: {"advantage_estimator": "gae"}, "unknown advantage estimator 'gae'",
                 id="advantage_estimator"),
    pytest.param(lambda: {"sync_every": 0}, "sync_every must be an integer ≥ 1; got 0",
                 id="sync_every"),
    pytest.param(lambda: {"max_grad_norm": 0.0},
                 r"max_grad_norm must be a finite number in \(0.0, inf\); got 0.0",
                 id="max_grad_norm"),
])
def test_bad_settings_fail_at_construction(random_model_dir, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _module(random_model_dir, **overrides())


def test_missing_model_path(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a known name and no model directory"):
        TrustRegionModule(policy=str(tmp_path / "nowhere"))


def test_tokenizer_without_pad_token(random_model_dir, tmp_path) -> None:
    import shutil

    from transformers import AutoTokenizer

    target = tmp_path / "nopad"
    shutil.copytree(random_model_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(target)
    with pytest.raises(ValueError, match="has no pad token"):
        TrustRegionModule(policy=f"config:{target}")
    module = TrustRegionModule(policy=f"config:{target}", pad_token="<eos>")
    assert module.tokenizer.pad_token == "<eos>"


def test_prompt_longer_than_context_fails_before_any_update(random_model_dir) -> None:
    # the tiny model's context is 64 positions
    module = _module(random_model_dir, sampling=_sampling(max_new_tokens=60))
    before = [p.clone() for p in module.policy.parameters()]
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        _fit(module, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.parameters(),
                                                  strict=True))


def test_kl_in_reward_shapes_rewards_instead_of_the_loss(random_model_dir) -> None:
    module = _module(random_model_dir, penalties=[ReferenceKL(beta=0.5, in_reward=True)],
                     optimizer=_adamw(1e-2))
    assert module.reference is not None
    keep = KeepSteps()
    trainer = _fit(module, steps=4, callbacks=[keep])
    assert "penalty/ref_kl" not in trainer.callback_metrics  # no KL term in the loss
    step = keep.steps[-1]
    rollout = step.rollout
    # Σ_t (log μ − log π_ref) per sequence, times β, averaged over sequences
    seq_kl = torch.where(rollout.completion_mask, rollout.behavior_logp - rollout.ref_logp,
                         0.0).sum(-1)
    assert trainer.callback_metrics["reward/penalty"].item() == pytest.approx(
        0.5 * seq_kl.mean().item(), rel=1e-5)
    assert step.metrics["reward/penalty"].item() == pytest.approx(0.5 * seq_kl.mean().item(),
                                                                  rel=1e-5)
    assert step.stats.reward_penalty is not None
    torch.testing.assert_close(step.stats.reward_penalty, 0.5 * seq_kl)
    torch.testing.assert_close(step.stats.rewards, rollout.rewards)  # before the penalty
    shaped = rollout.rewards - 0.5 * seq_kl
    groups = shaped.view(-1, 4)
    expected = ((groups - groups.mean(-1, keepdim=True))
                / (groups.std(-1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(rollout.advantages, expected)


def test_non_finite_gradient_never_reaches_weights_or_optimizer(random_model_dir) -> None:
    module = _module(random_model_dir, optimizer=_adamw(1e-2))
    state: dict[str, object] = {}

    class PoisonSecondIteration(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                state["params"] = [p.detach().clone() for p in pl_module.policy.parameters()]
                state["adam"] = {k: v["exp_avg"].clone() for k, v in
                                 pl_module.optimizers().optimizer.state.items()}
                original = pl_module._micro_step

                def poisoned(micro, counts):
                    loss, record, metrics = original(micro, counts)
                    return loss * float("nan"), record, metrics

                pl_module._micro_step = poisoned

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                del pl_module._micro_step
                state["after_params"] = [p.detach().clone() for p in pl_module.policy.parameters()]
                state["after_adam"] = {k: v["exp_avg"].clone() for k, v in
                                       pl_module.optimizers().optimizer.state.items()}
                state["skipped"] = float(trainer.callback_metrics["train/skipped_steps"])

    trainer = _fit(module, steps=6, callbacks=[PoisonSecondIteration()])
    assert trainer.global_step == 6  # 3 iterations × 2 steps: the empty steps count
    assert state["skipped"] == 2.0
    for before, after in zip(state["params"], state["after_params"], strict=True):
        assert torch.equal(before, after)
    for key, value in state["adam"].items():
        assert torch.equal(value, state["after_adam"][key])
    assert all(p.isfinite().all() for p in module.policy.parameters())


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def test_every_dataset_prompt_is_checked_before_training(random_model_dir, tmp_path) -> None:
    # 64 positions: the 50-character prompt on line 3 leaves no room for 20 new tokens. With one
    # prompt per step and one step it may never be drawn, but the run is refused up front.
    task = JsonlTask(_jsonl(tmp_path / "data.jsonl", ["1+1=", "2+2=", "x" * 50, "3+3="]))
    module = _module(random_model_dir, task=task, batching=_batching(prompts_per_step=1),
                     sampling=_sampling(max_new_tokens=20))
    before = [p.clone() for p in module.policy.parameters()]
    with pytest.raises(ValueError, match=r"a prompt of 5\d tokens plus max_new_tokens=20 exceeds "
                                         r"the model's context of 64 tokens \('xxxx"):
        _fit(module, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.parameters(),
                                                  strict=True))


@pytest.fixture
def templated_model_dir(random_model_dir, tmp_path) -> Path:
    """The random model with a chat template that adds 21 characters around each prompt."""
    directory = tmp_path / "templated"
    shutil.copytree(random_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = ("{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer.save_pretrained(directory)
    return directory


def test_prompt_length_counts_the_chat_template(templated_model_dir) -> None:
    # "12+7=" is 5 characters; "user: 12+7=\nassistant: " is 23. 23 + 45 > 64 ≥ 5 + 45.
    module = TrustRegionModule(policy=f"config:{templated_model_dir}", task=DigitRichArithmetic(),
                               chat_template=True, batching=BATCHING,
                               sampling=_sampling(max_new_tokens=45))
    with pytest.raises(ValueError, match=r"with the chat template plus max_new_tokens=45"):
        module._check_prompt_lengths(["12+7="], 45)
    plain = TrustRegionModule(policy=f"config:{templated_model_dir}", task=DigitRichArithmetic(),
                              batching=BATCHING, sampling=_sampling(max_new_tokens=45))
    plain._check_prompt_lengths(["12+7="], 45)  # 5 + 45 ≤ 64: accepted


def test_chat_template_without_a_template_fails_at_construction(random_model_dir) -> None:
    with pytest.raises(ValueError, match=r"chat_template=True, but the tokenizer of 'config:.*' "
                                         "has no chat template"):
        TrustRegionModule(policy=f"config:{random_model_dir}", chat_template=True, **SMALL)


# ------------------------------------------------------------------------------ penalties
class ConstantPenalty(Penalty):
    """Adds ``value`` to every counted token's loss: no gradient, so training is unchanged and
    the aggregated loss moves by exactly ``value`` under ``token-mean``."""

    needs_reference = True

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, batch: TokenBatch) -> PenaltyOutput:
        mask = batch.bool_mask()
        return PenaltyOutput(token_loss=torch.where(mask, self.value, 0.0),
                             metrics={"penalty/constant": torch.tensor(self.value)})


@pytest.mark.parametrize(("penalties", "built"), [
    ([], False),
    ([EntropyBonus(coef=0.01)], False),
    ([ReferenceKL(beta=0.01)], True),
    ([EntropyBonus(coef=0.01), ReferenceKL(beta=0.01, in_reward=True)], True),
    ([ConstantPenalty()], True),
])
def test_reference_is_built_iff_a_penalty_needs_it(random_model_dir, penalties, built) -> None:
    module = _module(random_model_dir, penalties=penalties)
    assert (module.reference is not None) is built
    assert module.penalties == penalties
    if built:
        assert module.reference is not None and not module.reference.training
        assert not any(p.requires_grad for p in module.reference.parameters())


def test_a_custom_penalty_is_added_to_the_loss_and_logs_its_metrics(random_model_dir) -> None:
    plain, shifted = KeepSteps(), KeepSteps()
    _fit(_module(random_model_dir), steps=2, callbacks=[plain])
    _fit(_module(random_model_dir, penalties=[ConstantPenalty(0.75)]), steps=2,
         callbacks=[shifted])
    before, after = plain.steps[0].metrics, shifted.steps[0].metrics
    assert set(after) == set(before) | {"penalty/constant"}
    assert float(after["penalty/constant"]) == 0.75
    # token-mean of a constant 0.75 on every counted token: Σ 0.75·m / N = 0.75 per step
    assert float(after["train/loss"]) == pytest.approx(float(before["train/loss"]) + 0.75,
                                                       abs=1e-6)
    for key in ("reward/mean", "train/grad_norm", "trust_region/weight_mean"):
        assert float(after[key]) == pytest.approx(float(before[key]), rel=1e-6), key


def test_hparams_hold_every_part_in_its_config_form(random_model_dir) -> None:
    module = _module(random_model_dir, penalties=[ReferenceKL(beta=0.01), EntropyBonus()],
                     optimizer=_adamw(1e-2), lr_scheduler=partial(LinearWarmup, warmup_steps=3))
    hparams = module.hparams
    assert hparams["batching"] == {"group_size": 4, "prompts_per_step": 2, "ppo_epochs": 1,
                                   "mini_batch_size": 4, "micro_batch_size": 2}
    assert hparams["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                   "max_new_tokens": 5, "sampler": "lean", "ignore_eos": False}
    assert hparams["penalties"] == [
        {"class_path": "trustregion.penalties.ReferenceKL",
         "init_args": {"beta": 0.01, "estimator": "k3", "in_reward": False}},
        {"class_path": "trustregion.penalties.EntropyBonus", "init_args": {"coef": 0.001}}]
    assert hparams["optimizer"] == {"class_path": "trustregion.optim.AdamW",
                                    "init_args": {"lr": 1e-2}}
    assert hparams["lr_scheduler"] == {"class_path": "trustregion.optim.LinearWarmup",
                                       "init_args": {"warmup_steps": 3}}
    defaults = _module(random_model_dir).hparams
    assert defaults["penalties"] is None
    assert defaults["optimizer"] == {"class_path": "trustregion.optim.AdamW"}
    assert defaults["lr_scheduler"] == {"class_path": "trustregion.optim.LinearWarmup"}


# ------------------------------------------------------------------ interface for callbacks
def test_behavior_topk_is_the_strategys_or_a_larger_request(random_model_dir) -> None:
    module = _module(random_model_dir)  # DRPO needs no top-K data
    assert module.strategy is module.trust_region
    assert module.behavior_topk == 0
    module.request_behavior_topk(3)
    module.request_behavior_topk(2)  # a smaller request never lowers it
    assert module.behavior_topk == 3
    keep = KeepSteps()
    _fit(module, steps=2, callbacks=[keep])
    record = keep.steps[0].updates[0]
    # K = 3 top ids plus the sampled id's slot
    assert record.batch.topk_behavior_logp is not None
    assert record.batch.topk_behavior_logp.shape[-1] == 4
    topk = _module(random_model_dir,
                   trust_region=DivergenceMask(divergence="topk_kl", divergence_top_k=5))
    topk.request_behavior_topk(3)
    assert topk.behavior_topk == 5
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"k must be an integer ≥ 0; got"):
            module.request_behavior_topk(bad)  # type: ignore[arg-type]


def test_training_state_round_trip_restores_weights_optimizer_and_counters(
        random_model_dir) -> None:
    module = _module(random_model_dir, optimizer=_adamw(1e-2), sync_every=3)
    saved: dict[str, Any] = {}

    def copied(state: Any) -> Any:
        if isinstance(state, torch.Tensor):
            return state.detach().clone()
        if isinstance(state, dict):
            return {key: copied(value) for key, value in state.items()}
        if isinstance(state, list | tuple):
            return type(state)(copied(value) for value in state)
        return state

    class UndoSecondBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                saved["state"] = copied(pl_module.training_state())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                saved["moved"] = copied(pl_module.training_state())
                pl_module.load_training_state(saved["state"])
                saved["restored"] = copied(pl_module.training_state())

    _fit(module, steps=4, callbacks=[UndoSecondBatch()])
    state, moved, restored = saved["state"], saved["moved"], saved["restored"]
    assert set(state) == {"models", "optimizers", "schedulers", "counters"}
    assert set(state["models"]) == {"policy", "behavior"}
    # 2 optimiser steps per batch, sync every 3: 2 steps since the sync before batch 1,
    # 1 after it (synced at step 3)
    assert state["counters"] == {"steps_since_sync": 2}
    assert moved["counters"] == {"steps_since_sync": 1}
    assert restored["counters"] == state["counters"]
    name = next(iter(state["models"]["policy"]))
    assert not torch.equal(moved["models"]["policy"][name], state["models"]["policy"][name])
    for model in ("policy", "behavior"):
        for key, value in state["models"][model].items():
            assert torch.equal(restored["models"][model][key], value), (model, key)
    adam, adam_before, adam_moved = (s["optimizers"][0]["state"][0]
                                     for s in (restored, state, moved))
    assert adam_moved["step"] == adam_before["step"] + 2  # two optimiser steps were undone
    assert adam["step"] == adam_before["step"]
    torch.testing.assert_close(adam["exp_avg"], adam_before["exp_avg"])
    assert restored["schedulers"] == state["schedulers"]
    assert module.steps_since_sync == 2 and module.next_prompt_batch == 2
