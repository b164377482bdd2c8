"""The LightningModule: policy, frozen reference and behaviour models, and the RL update loop.

One training step of Lightning is one RL iteration:

1. the **behaviour** model samples ``group_size`` completions for each of ``prompts_per_step``
   prompts and records the log-prob of every sampled token under the distribution it sampled
   from (see :mod:`trustregion.rollout`);
2. the task's reward function scores them and an advantage estimator turns rewards into
   advantages;
3. ``ppo_epochs`` passes over shuffled mini-batches follow, each mini-batch one optimiser step
   (gradient accumulation over micro-batches, global token counts, gradient clipping), through
   ``trust_region`` and the chosen aggregation.

The behaviour model is a frozen copy of the policy re-synchronised every ``sync_every``
optimiser steps, so staleness is a setting, like an asynchronous inference engine.
The module never looks at which strategy it holds.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from transformers import PreTrainedModel

from trustregion.advantages import AdvantageEstimator, compute_advantages
from trustregion.data import PromptBatch, PromptStream, derive_seed
from trustregion.functional.aggregation import (
    AggregationMode,
    aggregate,
    check_aggregation,
    step_counts,
)
from trustregion.functional.logprobs import gather_logprobs, token_entropy, token_logprobs
from trustregion.metric_reduction import MetricAccumulator
from trustregion.models.loading import TINY, load_model
from trustregion.penalties import EntropyBonus, PenaltyOutput, ReferenceKL
from trustregion.rollout import (
    Rollout,
    SamplingSettings,
    completion_logits,
    generate_rollout,
    prompt_lengths,
)
from trustregion.specs import to_spec
from trustregion.step_logging import flush_step_values, log_step_values, writes_logs
from trustregion.strategies import DRPO, StrategyOutput, TokenBatch, TrustRegionStrategy
from trustregion.tasks import Arithmetic, Task

__all__ = ["TrustRegionModule", "UpdateRecord"]

# The behaviour and reference models are frozen in eval mode on purpose, and a checkpoint taken
# after an RL iteration is meant to hold the updated weights: Lightning's generic warnings about
# both would only mislead here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")


@dataclass
class UpdateRecord:
    """What one micro-batch update saw, detached: the per-token inputs and the strategy's
    per-token output. Returned from ``training_step`` for callbacks."""

    batch: TokenBatch
    output: StrategyOutput


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1; got {value!r}")


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


class TrustRegionModule(L.LightningModule):
    """RL post-training of a causal LM with a pluggable trust region.

    Args:
        trust_region: the strategy; default ``DRPO()``. From the CLI: a registered name
            (``drpo``), ``{name: drpo, delta: 0.1}`` or ``{class_path: ..., init_args: ...}``.
        task: prompts and verifiable rewards; default ``Arithmetic()``.
        policy: model source (see :mod:`trustregion.models.loading`).
        reference: source of the frozen reference model for the KL penalty; None uses a frozen
            copy of the initial policy (only built when ``kl_coef > 0``).
        sync_every: optimiser steps between behaviour-model syncs (1: behaviour = policy at
            every rollout).
        group_size: completions per prompt (≥ 2: every advantage estimator is group-relative).
        prompts_per_step: prompts per RL iteration.
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: sequences per optimiser step.
        micro_batch_size: sequences per forward/backward (gradient accumulation); None = mini.
        advantage_estimator: ``grpo``, ``dr_grpo`` or ``rloo``.
        aggregation: loss aggregation mode; ``seq-mean-token-sum-norm`` uses
            ``max_new_tokens`` as its fixed horizon.
        temperature, top_p, top_k, max_new_tokens: behaviour sampling settings.
        kl_coef, kl_estimator: reference-KL penalty β and estimator (0 turns it off).
        kl_in_reward: subtract β · Σ_t (log μ − log π_ref) from each sequence's reward before
            advantages (the InstructGPT form) instead of adding β · KL to the loss.
        entropy_coef: entropy bonus coefficient (0 turns it off).
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW, linear warm-up, clipping.
        chat_template: wrap prompts in the tokenizer's chat template.
        pad_token: set this token as the tokenizer's pad token when it has none.
        seed: seeds prompts, sampling and mini-batch shuffling, step by step.
    """

    def __init__(
        self,
        trust_region: TrustRegionStrategy | None = None,
        task: Task | None = None,
        policy: str = TINY,
        reference: str | None = None,
        sync_every: int = 1,
        group_size: int = 8,
        prompts_per_step: int = 8,
        ppo_epochs: int = 1,
        mini_batch_size: int = 64,
        micro_batch_size: int | None = None,
        advantage_estimator: AdvantageEstimator = "grpo",
        aggregation: AggregationMode = "token-mean",
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 16,
        kl_coef: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        kl_in_reward: bool = False,
        entropy_coef: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        chat_template: bool = False,
        pad_token: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.trust_region = trust_region if trust_region is not None else DRPO()
        if not isinstance(self.trust_region, TrustRegionStrategy):
            raise ValueError(f"trust_region must be a TrustRegionStrategy; got "
                             f"{type(self.trust_region).__name__}")
        self.task = task if task is not None else Arithmetic()
        for name in ("sync_every", "group_size", "prompts_per_step", "ppo_epochs",
                     "mini_batch_size"):
            _require_positive_int(name, locals()[name])
        if micro_batch_size is not None:
            _require_positive_int("micro_batch_size", micro_batch_size)
        if group_size < 2:
            raise ValueError(f"group_size must be ≥ 2: the advantage estimator "
                             f"{advantage_estimator!r} compares completions within a group; "
                             f"got {group_size}")
        check_aggregation(aggregation, max_new_tokens)
        self.sampling = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k,
                                         max_new_tokens=max_new_tokens)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0; got {lr}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0; got {max_grad_norm}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0; got {warmup_steps}")
        compute_advantages(advantage_estimator, torch.zeros(group_size), group_size)
        self.penalties: list[ReferenceKL | EntropyBonus] = []
        if kl_coef > 0 and not kl_in_reward:
            self.penalties.append(ReferenceKL(beta=kl_coef, estimator=kl_estimator))
        elif kl_coef < 0:
            raise ValueError(f"kl_coef must be ≥ 0 (0 turns the penalty off); got {kl_coef}")
        if entropy_coef > 0:
            self.penalties.append(EntropyBonus(coef=entropy_coef))
        elif entropy_coef < 0:
            raise ValueError(f"entropy_coef must be ≥ 0; got {entropy_coef}")

        self.policy, self.tokenizer = load_model(policy)
        if self.tokenizer.pad_token is None:
            if pad_token is None:
                raise ValueError(
                    f"the tokenizer of {policy!r} has no pad token, which batched generation "
                    "needs; set pad_token (for example to the tokenizer's eos token "
                    f"{self.tokenizer.eos_token!r})")
            self.tokenizer.pad_token = pad_token
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"chat_template=True, but the tokenizer of {policy!r} has no chat template; "
                "set chat_template=False to send the prompts as plain text")
        self.tokenizer.padding_side = "left"
        self.policy.train()
        self.behavior: PreTrainedModel = _frozen(copy.deepcopy(self.policy))
        self.reference: PreTrainedModel | None = None
        if kl_coef > 0:
            self.reference = _frozen(copy.deepcopy(self.policy) if reference is None
                                     else load_model(reference)[0])

        self.group_size = group_size
        self.prompts_per_step = prompts_per_step
        self.ppo_epochs = ppo_epochs
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size or mini_batch_size
        self.sync_every = sync_every
        self.advantage_estimator: AdvantageEstimator = advantage_estimator
        self.aggregation: AggregationMode = aggregation
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.chat_template = chat_template
        self.kl_coef = kl_coef
        self.kl_in_reward = kl_in_reward
        self.seed = seed
        # The strategy and the task in their config form (hparams.yaml shows every setting, and
        # `trustregion fit --ckpt_path` rebuilds them from the checkpoint as configured).
        self.save_hyperparameters(ignore=["trust_region", "task"])
        self.save_hyperparameters({**self.hparams, "trust_region": to_spec(self.trust_region),
                                   "task": to_spec(self.task)})
        self.steps_since_sync = 0
        self.next_prompt_batch = 0
        self.record_topk = 0
        """Record at least this many top-K behaviour log-probs per token, beyond what the
        strategy needs (callbacks that evaluate other strategies raise it in ``setup``)."""

    # ----------------------------------------------------------------------------- data
    def train_dataloader(self) -> PromptStream:
        return PromptStream(self.task, self.prompts_per_step, seed=self.seed,
                            start=self.next_prompt_batch)

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int) -> Any:
        return batch  # prompts are text; tensors are made on the right device later

    # ---------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.lr,
                                      weight_decay=self.weight_decay)
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimiser steps one rollout batch makes, each counted in ``trainer.global_step``:
        ``ppo_epochs`` × ⌈group_size · prompts_per_step / mini_batch_size⌉."""
        sequences = self.group_size * self.prompts_per_step
        return self.ppo_epochs * -(-sequences // self.mini_batch_size)

    # ---------------------------------------------------------------------------- steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        """One RL iteration. Returns ``{"rollout": Rollout, "updates": [UpdateRecord, ...]}``
        (all detached) for callbacks: the sampled batch with rewards and advantages, and the
        per-token inputs and strategy outputs of every micro-batch update."""
        self.next_prompt_batch = batch.index + 1
        rollout = self.rollout(batch)
        records, update_metrics = self.update(rollout, batch.index)
        self._log_step(rollout, update_metrics, batch_idx)
        return {"rollout": rollout, "updates": records}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning runs this after every callback's hook: the row holds the monitors' values.
        flush_step_values(self.trainer)

    def rollout(self, batch: PromptBatch) -> Rollout:
        """Sample, score and compute advantages (and old/reference log-probs if needed)."""
        if self.task.all_examples() is None:  # a dataset was checked whole in on_fit_start
            self._check_prompt_lengths([ex.prompt for ex in batch.examples])
        with self._seeded(derive_seed(self.seed, 2 * batch.index)):
            rollout = generate_rollout(
                self.behavior, self.tokenizer, batch.examples,
                group_size=self.group_size, sampling=self.sampling,
                topk=max(self.trust_region.behavior_topk, self.record_topk),
                chat_template=self.chat_template)
        rollout.rewards = self.task.reward(rollout.completions, rollout.examples).to(self.device)
        with torch.no_grad():
            if self.trust_region.anchor == "old":
                rollout.old_logp = self._completion_logp(self.policy, rollout)
            if self.reference is not None:
                rollout.ref_logp = self._completion_logp(self.reference, rollout)
        shaped = rollout.rewards
        self._reward_kl: Tensor | None = None
        if self.kl_in_reward and rollout.ref_logp is not None:
            log_ratio = torch.where(rollout.completion_mask,
                                    rollout.behavior_logp - rollout.ref_logp, 0.0)
            self._reward_kl = self.kl_coef * log_ratio.sum(-1)
            shaped = rollout.rewards - self._reward_kl
        advantages = compute_advantages(self.advantage_estimator, shaped, self.group_size)
        rollout.advantages = advantages.values
        self._frac_reward_zero_std = advantages.frac_reward_zero_std
        return rollout

    def update(self, rollout: Rollout, index: int
               ) -> tuple[list[UpdateRecord], dict[str, Tensor]]:
        """``ppo_epochs`` passes of optimiser steps over shuffled mini-batches of ``rollout``."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        assert isinstance(optimizer, LightningOptimizer)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, 2 * index + 1))
        records: list[UpdateRecord] = []
        token_metrics = MetricAccumulator()
        step_losses, grad_norms = [], []
        for _ in range(self.ppo_epochs):
            order = torch.randperm(len(rollout), generator=shuffle).to(self.device)
            for mini_index in order.split(self.mini_batch_size):
                micro_batches = [rollout.select(i)
                                 for i in mini_index.split(self.micro_batch_size)]
                counts = step_counts([m.completion_mask for m in micro_batches])
                step_loss = torch.zeros((), device=self.device)
                for micro in micro_batches:
                    loss, record, metrics = self._micro_step(micro, counts)
                    self.manual_backward(loss)
                    records.append(record)
                    token_metrics.add(metrics, record.batch.mask,
                                      record.batch.token_advantages())
                    step_loss = step_loss + loss.detach()
                step_losses.append(step_loss)
                grad_norms.append(self._clip_and_step(optimizer, scheduler))
        norms = torch.stack(grad_norms)
        metrics = token_metrics.compute()
        metrics["train/loss"] = torch.stack(step_losses).mean()
        metrics["train/grad_norm"] = norms[norms.isfinite()].mean() if norms.isfinite().any() \
            else torch.tensor(float("nan"))
        metrics["train/skipped_steps"] = (~norms.isfinite()).sum().float()
        return records, metrics

    def _clip_and_step(self, optimizer: LightningOptimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> Tensor:
        """Clip gradients and step. A non-finite gradient is dropped first, so a NaN or inf never
        reaches the weights or the optimiser's moments; the (empty) step still counts towards
        ``max_steps``. Returns the pre-clip norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are skipped
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._after_optimizer_step()
        return grad_norm.detach()

    def _micro_step(self, micro: Rollout, counts: Any
                    ) -> tuple[Tensor, UpdateRecord, dict[str, Tensor]]:
        logits = completion_logits(self.policy, micro) / self.sampling.temperature
        logp = token_logprobs(logits, micro.completion_ids)
        needs_entropy_grad = any(isinstance(p, EntropyBonus) for p in self.penalties)
        if needs_entropy_grad:
            entropy = token_entropy(logits)
        else:
            with torch.no_grad():
                entropy = token_entropy(logits.detach())
        topk_logp = None
        if micro.topk_ids is not None:
            with torch.no_grad():
                topk_logp = gather_logprobs(logits.detach(), micro.topk_ids)
        assert micro.advantages is not None
        batch = TokenBatch(
            logp=logp, behavior_logp=micro.behavior_logp, advantages=micro.advantages,
            mask=micro.completion_mask, old_logp=micro.old_logp, ref_logp=micro.ref_logp,
            entropy=entropy, topk_logp=topk_logp, topk_behavior_logp=micro.topk_behavior_logp)
        output = self.trust_region(batch)
        token_loss = output.token_loss
        metrics = dict(output.metrics)
        for penalty in self.penalties:
            term: PenaltyOutput = penalty(batch)
            token_loss = token_loss + term.token_loss
            metrics.update(term.metrics)
        loss = aggregate(token_loss, micro.completion_mask, self.aggregation,
                         counts=counts, horizon=self.sampling.max_new_tokens)
        detached = TokenBatch(
            logp=logp.detach(), behavior_logp=micro.behavior_logp,
            advantages=micro.advantages, mask=micro.completion_mask, old_logp=micro.old_logp,
            ref_logp=micro.ref_logp, entropy=entropy.detach(), topk_logp=topk_logp,
            topk_behavior_logp=micro.topk_behavior_logp)
        record = UpdateRecord(batch=detached, output=StrategyOutput(
            token_loss=output.token_loss.detach(), metrics=output.metrics,
            weight=output.weight, outside=output.outside))
        return loss, record, metrics

    def _completion_logp(self, model: PreTrainedModel, rollout: Rollout) -> Tensor:
        micro = self.micro_batch_size
        parts = []
        for index in torch.arange(len(rollout), device=self.device).split(micro):
            part = rollout.select(index)
            logits = completion_logits(model, part) / self.sampling.temperature
            parts.append(token_logprobs(logits, part.completion_ids))
        return torch.cat(parts)

    def _after_optimizer_step(self) -> None:
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.sync_every:
            self.sync_behavior()

    def sync_behavior(self) -> None:
        """Copy the policy's weights into the behaviour model."""
        self.behavior.load_state_dict(self.policy.state_dict())
        self.steps_since_sync = 0

    # -------------------------------------------------------------------------- helpers
    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def on_fit_start(self) -> None:
        # A dataset's prompts are all checked before the first rollout, so a long one drawn late
        # cannot end a run hours in; generated tasks are checked batch by batch.
        examples = self.task.all_examples()
        if examples:
            self._check_prompt_lengths([ex.prompt for ex in examples])

    def _check_prompt_lengths(self, prompts: list[str]) -> None:
        """Refuse prompts that leave no room for ``max_new_tokens`` in the policy's context,
        counting tokens as the rollout encodes them (chat template included)."""
        context = getattr(self.policy.config, "max_position_embeddings", None)
        if context is None or not prompts:
            return
        lengths = prompt_lengths(self.tokenizer, prompts, chat_template=self.chat_template)
        longest = max(range(len(prompts)), key=lengths.__getitem__)
        if lengths[longest] + self.sampling.max_new_tokens > context:
            template = " with the chat template" if self.chat_template else ""
            raise ValueError(
                f"a prompt of {lengths[longest]} tokens{template} plus max_new_tokens="
                f"{self.sampling.max_new_tokens} exceeds the model's context of {context} "
                f"tokens ({prompts[longest][:60]!r}...); shorten the prompts or lower "
                "max_new_tokens")

    def _log_step(self, rollout: Rollout, update_metrics: dict[str, Tensor],
                  batch_idx: int) -> None:
        assert rollout.rewards is not None
        lengths = rollout.lengths.float()
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        metrics = {
            "reward/mean": rollout.rewards.mean(),
            "reward/std": rollout.rewards.std(),
            "reward/frac_zero_std": self._frac_reward_zero_std,
            **({"reward/kl_penalty": self._reward_kl.mean()} if self._reward_kl is not None
               else {}),
            "response/length_mean": lengths.mean(),
            "response/length_max": lengths.max(),
            "train/lr": torch.tensor(optimizer.param_groups[0]["lr"]),
            **update_metrics,
        }
        metrics = {k: v.detach().float().to(self.device) for k, v in metrics.items()}
        log_step_values(self.trainer, metrics, to_loggers=writes_logs(self.trainer, batch_idx))
        self.log("reward", metrics["reward/mean"], prog_bar=True, logger=False,
                 batch_size=len(rollout))
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False,
                 batch_size=len(rollout))

    # ---------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trustregion"] = {
            "strategy_class": f"{type(self.trust_region).__module__}."
                              f"{type(self.trust_region).__qualname__}",
            "strategy_state": self.trust_region.state_dict(),
            "steps_since_sync": self.steps_since_sync,
            "next_prompt_batch": self.next_prompt_batch,
            "seed": self.seed,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("trustregion")
        if state is None:
            raise ValueError("this checkpoint was not written by TrustRegionModule "
                             "(no 'trustregion' state)")
        expected = f"{type(self.trust_region).__module__}.{type(self.trust_region).__qualname__}"
        if state["strategy_class"] != expected:
            raise ValueError(f"the checkpoint was trained with {state['strategy_class']}, but "
                             f"this module holds {expected}; configure the same strategy")
        self.trust_region.load_state_dict(state["strategy_state"])
        self.steps_since_sync = state["steps_since_sync"]
        self.next_prompt_batch = state["next_prompt_batch"]
