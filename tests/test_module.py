from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DigitRichArithmetic
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoTokenizer

from trustregion.module import TrustRegionModule
from trustregion.strategies import SHARED_METRICS, DivergenceMask, RatioClip
from trustregion.tasks import JsonlTask

SMALL = {"group_size": 4, "prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2,
         "max_new_tokens": 5}


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
    trainer = _fit(_module(random_model_dir, kl_coef=0.01, entropy_coef=0.001), steps=4,
                   logger=CSVLogger(tmp_path, name="run", version=0))
    expected = {
        "reward/mean", "reward/std", "reward/frac_zero_std", "response/length_mean",
        "response/length_max", "train/lr", "train/loss", "train/grad_norm",
        "train/skipped_steps", "penalty/ref_kl", "penalty/entropy", "trust_region/penalty_mean",
        *(f"trust_region/{k}" for k in SHARED_METRICS),
    }
    assert set(trainer.logged_metrics) == expected
    assert set(trainer.progress_bar_metrics) == {"reward", "loss"}
    assert expected <= set(trainer.callback_metrics)
    rows = _metrics_by_step(tmp_path / "run" / "version_0" / "metrics.csv")
    assert sorted(rows) == [0, 1]  # one row per rollout batch (2 optimiser steps each)
    for row in rows.values():
        assert {key for key, value in row.items() if value} == expected | {"step", "epoch"}


def test_two_rollout_batches_make_the_expected_number_of_optimiser_steps(random_model_dir):
    # 2 prompts × 4 completions = 8 sequences; mini-batches of 4 → 2 steps per epoch; 2 epochs.
    module = _module(random_model_dir, ppo_epochs=2)
    trainer = _fit(module, steps=8)
    assert trainer.global_step == 8
    assert module.next_prompt_batch == 2


@pytest.mark.parametrize(("sync_every", "in_sync"), [(1, True), (3, False), (4, True)])
def test_behavior_is_synced_every_n_optimizer_steps(random_model_dir, sync_every, in_sync):
    module = _module(random_model_dir, sync_every=sync_every, lr=1e-2)
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
    module = _module(random_model_dir, trust_region=DivergenceMask(divergence="topk_kl", top_k=3))
    outputs = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out)

    _fit(module, steps=1, callbacks=[Keep()])
    record = outputs[0]["updates"][0]
    assert record.batch.topk_logp is not None and record.batch.topk_logp.shape[-1] == 4


def _metrics_by_step(path: Path) -> dict[int, dict[str, str]]:
    with open(path) as handle:
        return {int(row["step"]): row for row in csv.DictReader(handle)}


def test_resumed_run_logs_the_same_metrics(random_model_dir, tmp_path) -> None:
    # 3 rollout batches of 4 optimiser steps each (2 epochs × 2 mini-batches); the behaviour
    # model syncs every 3 steps, so the checkpoint at step 4 falls between two syncs.
    kwargs = {"sync_every": 3, "ppo_epochs": 2, "lr": 5e-3}
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
                     kl_coef=0.01)
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

    restored = _module(random_model_dir, trust_region=RatioClip(epsilon_high=0.28), kl_coef=0.01)
    restored.on_load_checkpoint(ckpt)
    assert restored.trust_region.epsilon_high == pytest.approx(0.14)
    other = _module(random_model_dir, trust_region=DivergenceMask())
    with pytest.raises(ValueError, match=r"trained with trustregion\.strategies\.ratio_clip"):
        other.on_load_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": 1}, "group_size must be ≥ 2"),
        ({"mini_batch_size": 0}, "mini_batch_size must be an integer ≥ 1"),
        ({"aggregation": "mean"}, "unknown aggregation mode 'mean'"),
        ({"advantage_estimator": "gae"}, "unknown advantage estimator 'gae'"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"kl_coef": -1.0}, "kl_coef must be ≥ 0"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ],
)
def test_bad_settings_fail_at_construction(random_model_dir, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _module(random_model_dir, **overrides)


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
    module = _module(random_model_dir, max_new_tokens=60)  # tiny context: 64 positions
    before = [p.clone() for p in module.policy.parameters()]
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        _fit(module, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.parameters(),
                                                  strict=True))


def test_kl_in_reward_shapes_rewards_instead_of_the_loss(random_model_dir) -> None:
    module = _module(random_model_dir, kl_coef=0.5, kl_in_reward=True, lr=1e-2)
    outputs = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out)

    trainer = _fit(module, steps=4, callbacks=[Keep()])
    assert "penalty/ref_kl" not in trainer.callback_metrics  # no KL term in the loss
    rollout = outputs[-1]["rollout"]
    # Σ_t (log μ − log π_ref) per sequence, times β, averaged over sequences
    seq_kl = torch.where(rollout.completion_mask, rollout.behavior_logp - rollout.ref_logp,
                         0.0).sum(-1)
    assert trainer.callback_metrics["reward/kl_penalty"].item() == pytest.approx(
        0.5 * seq_kl.mean().item(), rel=1e-5)
    shaped = rollout.rewards - 0.5 * seq_kl
    groups = shaped.view(-1, 4)
    expected = ((groups - groups.mean(-1, keepdim=True))
                / (groups.std(-1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(rollout.advantages, expected)


def test_non_finite_gradient_never_reaches_weights_or_optimizer(random_model_dir) -> None:
    module = _module(random_model_dir, lr=1e-2)
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
    module = _module(random_model_dir, task=task, prompts_per_step=1, max_new_tokens=20)
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
                               chat_template=True, **{**SMALL, "max_new_tokens": 45})
    with pytest.raises(ValueError, match=r"with the chat template plus max_new_tokens=45"):
        module._check_prompt_lengths(["12+7="])
    plain = TrustRegionModule(policy=f"config:{templated_model_dir}", task=DigitRichArithmetic(),
                              **{**SMALL, "max_new_tokens": 45})
    plain._check_prompt_lengths(["12+7="])  # 5 + 45 ≤ 64: accepted


def test_chat_template_without_a_template_fails_at_construction(random_model_dir) -> None:
    with pytest.raises(ValueError, match=r"chat_template=True, but the tokenizer of 'config:.*' "
                                         "has no chat template"):
        TrustRegionModule(policy=f"config:{random_model_dir}", chat_template=True, **SMALL)
