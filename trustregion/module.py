"""The LightningModule: policy, frozen reference and behaviour models, and the RL update loop.

One training step of Lightning is one RL iteration:

1. the **behaviour** model samples ``group_size`` completions for each prompt and records the
   log-prob of every sampled token under the distribution it sampled from (see
   :mod:`trustregion.rollout`); with several processes each rank samples its share of the
   prompts, whole groups per rank;
2. the task's reward function scores them, in-reward penalties are subtracted and an advantage
   estimator turns rewards into advantages;
3. ``ppo_epochs`` passes over shuffled mini-batches follow, each mini-batch one optimiser step
   (gradient accumulation over micro-batches, token and sequence counts of the whole step
   summed over ranks, gradient clipping), through ``trust_region`` and the chosen aggregation;
4. the step's values, reduced across ranks, go into the :class:`~trustregion.step_log.StepLog`
   row that callbacks add to, and ``training_step`` returns a
   :class:`~trustregion.interface.StepOutput` for them.

The behaviour model is a frozen copy of the policy re-synchronised every ``sync_every``
optimiser steps, so staleness is a setting, like an asynchronous inference engine.
The module never looks at which strategy or penalty it holds.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from transformers import PreTrainedModel

from trustregion.advantages import AdvantageEstimator, compute_advantages
from trustregion.batching import BatchSettings
from trustregion.data import PromptBatch, PromptStream, derive_seed
from trustregion.evaluation import (
    EvaluationSettings,
    EvaluationTotals,
    ValidationBatch,
    ValidationBatches,
    batch_seed,
    check_every_prompt_scored,
    check_schedule,
    evaluate_share,
    generate_completions,
    validation_batches,
)
from trustregion.functional.aggregation import (
    AggregationMode,
    StepCounts,
    aggregate,
    check_aggregation,
    step_counts,
)
from trustregion.interface import StepOutput, UpdateRecord
from trustregion.metric_reduction import MetricAccumulator, Reduce, reduce_across_ranks
from trustregion.models.loading import TINY, load_model, prepare_tokenizer
from trustregion.optim import AdamW, LinearWarmup
from trustregion.penalties import Penalty
from trustregion.precision import (
    PrecisionSettings,
    describe_fp8_paths,
    enable_fp8_training,
    load_weights,
    low_precision_copy,
)
from trustregion.precision.trainer import check_trainer_precision, precision_summary
from trustregion.prediction import (
    Completion,
    PredictionBatch,
    PredictionBatches,
    PredictionRefused,
    PredictionSettings,
    prediction_batches,
)
from trustregion.prefix_sharing import PositionCount, PrefixSharing, TokenLogits, sharing_order
from trustregion.prompt_checks import check_prompt_text, unknown_tokens
from trustregion.resume import (
    ResumeRefused,
    apply_changed_settings,
    refusal,
    run_defining_differences,
    run_seed,
)
from trustregion.rollout import (
    Rollout,
    RolloutStats,
    SamplingSettings,
    completion_logits,
    encode_prompts,
    generate_rollout,
    prompt_lengths,
    seeded,
)
from trustregion.routing import check_routing_replay
from trustregion.sharding import (
    check_fsdp_layout,
    check_strategy,
    clip_grad_norm,
    differing_models,
    full_state_dict,
    gradient_sync_skipped,
    is_sharded,
    shard_model,
)
from trustregion.specs import to_spec
from trustregion.step_log import StepLog
from trustregion.stopping import unbounded_run_warning
from trustregion.strategies import DRPO, StrategyOutput, TokenBatch, TrustRegionStrategy
from trustregion.tasks import Arithmetic, Task
from trustregion.tasks.jsonl import PromptLine
from trustregion.validation import boolean, integer_at_least, number_in, require

__all__ = ["TrustRegionModule", "UpdateRecord"]

# Every model runs in eval mode on purpose (the behaviour and reference are frozen copies; the
# policy recomputes its log-probs without dropout, like the behaviour that sampled), and a
# checkpoint taken after an RL iteration is meant to hold the updated weights: Lightning's
# generic warnings about both would only mislead here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")

def configured_dropout(config: Any) -> dict[str, float]:
    """The non-zero dropout probabilities of a model config (attributes named ``*dropout*`` or
    ``*pdrop*``), leaving out those of heads a causal language model does not have (GPT-2's
    ``summary_*`` and the ``classifier_*`` of sequence classifiers).

    >>> from transformers import GPT2Config
    >>> configured_dropout(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.2))
    {'attn_pdrop': 0.2}
    """
    return {name: float(value) for name, value in sorted(config.to_dict().items())
            if ("dropout" in name or "pdrop" in name)
            and not name.startswith(("summary_", "classifier_"))
            and isinstance(value, int | float) and not isinstance(value, bool) and value > 0}


def _callable_spec(value: Any) -> Any:
    """A config form of an optimiser or scheduler callable for ``hparams.yaml``: a class as
    ``{class_path}``, a ``functools.partial`` of one with its keywords as ``init_args``; the
    CLI's own form (already a dict) is kept."""
    if isinstance(value, Mapping):
        return dict(value)
    func = getattr(value, "func", None)
    target = func if isinstance(func, type) else value
    if not isinstance(target, type):
        return repr(value)
    spec: dict[str, Any] = {"class_path": f"{target.__module__}.{target.__qualname__}"}
    if target is func and getattr(value, "keywords", None):
        spec["init_args"] = dict(value.keywords)
    return spec


def _penalty_spec(penalty: Penalty) -> dict[str, Any]:
    cls = type(penalty)
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {name: getattr(penalty, name) for name in names
                          if hasattr(penalty, name)}}


class TrustRegionModule(L.LightningModule):
    """RL post-training of a causal LM with a pluggable trust region.

    Args:
        trust_region: the strategy; default ``DRPO()``. From the CLI: a registered name
            (``drpo``), ``{name: drpo, delta: 0.1}`` or ``{class_path: ..., init_args: ...}``.
        task: prompts and verifiable rewards; default ``Arithmetic()``.
        policy: model source (see :mod:`trustregion.models.loading`).
        reference: source of the frozen reference model; None uses a frozen copy of the
            initial policy. Built only when a penalty needs it.
        sampling: how the behaviour model samples (temperature, top-p, top-k,
            ``max_new_tokens``).
        precision: the precision of the behaviour and reference models (``fp32``, ``bf16``,
            ``fp16``, ``int8``, ``nf4``, ``fp8``) and whether the policy trains its Linear
            layers in FP8 (:mod:`trustregion.precision`); the policy's own dtype and autocast
            follow ``trainer.precision``.
        batching: group size, prompts per step, PPO epochs, mini- and micro-batch sizes.
        evaluation: held-out evaluation of the policy (:mod:`trustregion.evaluation`), run
            every ``trainer.val_check_interval`` rollout batches and by ``trustregion
            validate``; None: no evaluation.
        advantage_estimator: ``grpo``, ``dr_grpo`` or ``rloo``.
        aggregation: loss aggregation mode; ``seq-mean-token-sum-norm`` uses
            ``sampling.max_new_tokens`` as its fixed horizon.
        penalties: strategy-independent terms (:mod:`trustregion.penalties`): a reference-KL
            penalty in the loss or in the reward, an entropy bonus, or your own ``Penalty``.
        optimizer: parameters → optimiser (Lightning's ``OptimizerCallable``); default
            :class:`~trustregion.optim.AdamW` (lr 1e-4).
        lr_scheduler: optimiser → scheduler stepped once per optimiser step
            (``LRSchedulerCallable``); default :class:`~trustregion.optim.LinearWarmup`
            without warm-up (a constant rate).
        max_grad_norm: gradient-norm clipping threshold.
        sync_every: optimiser steps between behaviour-model syncs (1: behaviour = policy at
            every rollout).
        chat_template: wrap prompts in the tokenizer's chat template.
        pad_token: set this token as the tokenizer's pad token when it has none.
        seed: seeds prompts, sampling and mini-batch shuffling, step by step; None follows
            ``seed_everything`` (0 when nothing was seeded). The resolved seed is what
            ``hparams`` and checkpoints hold.
        routing_replay: for a mixture-of-experts policy, record the behaviour's expert choices
            during generation and replay them in the policy's forward passes (the reference
            model is not replayed; :mod:`trustregion.routing`). Refused for a model without a
            supported router.
        prefix_sharing: compute the log-probs of the update, and the old and reference
            log-probs, with each distinct prompt run once and no padding between sequences:
            one packed forward per micro-batch with a tree attention mask
            (:mod:`trustregion.packing`), or a shared key/value cache where the model's
            attention takes no such mask (:mod:`trustregion.prefix_sharing`). The same values
            as the full forward up to floating-point reordering; a model neither applies to
            uses the full forward, and the log says so once. False: always the full forward.
    """

    def __init__(
        self,
        trust_region: TrustRegionStrategy | None = None,
        task: Task | None = None,
        policy: str = TINY,
        reference: str | None = None,
        sampling: SamplingSettings = SamplingSettings(),  # noqa: B008 (frozen)
        precision: PrecisionSettings = PrecisionSettings(),  # noqa: B008 (frozen)
        batching: BatchSettings = BatchSettings(),  # noqa: B008 (frozen)
        evaluation: EvaluationSettings | None = None,
        advantage_estimator: AdvantageEstimator = "grpo",
        aggregation: AggregationMode = "token-mean",
        penalties: list[Penalty] | None = None,
        optimizer: OptimizerCallable = AdamW,
        lr_scheduler: LRSchedulerCallable = LinearWarmup,
        max_grad_norm: float = 1.0,
        sync_every: int = 1,
        chat_template: bool = False,
        pad_token: str | None = None,
        seed: int | None = None,
        routing_replay: bool = False,
        prefix_sharing: bool = True,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.trust_region = trust_region if trust_region is not None else DRPO()
        if not isinstance(self.trust_region, TrustRegionStrategy):
            raise ValueError(f"trust_region must be a TrustRegionStrategy; got "
                             f"{type(self.trust_region).__name__}")
        self.task = task if task is not None else Arithmetic()
        for name, value, kind in (("sampling", sampling, SamplingSettings),
                                  ("precision", precision, PrecisionSettings),
                                  ("batching", batching, BatchSettings)):
            if not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__}; got {type(value).__name__}")
        if evaluation is not None and not isinstance(evaluation, EvaluationSettings):
            raise ValueError(f"evaluation must be an EvaluationSettings or None; got "
                             f"{type(evaluation).__name__}")
        self.evaluation = evaluation
        # Drawn now, so that a task without a held-out split fails before anything loads.
        self.validation_examples = (self.task.validation_examples(evaluation.prompts)
                                    if evaluation is not None else [])
        integer_at_least("sync_every", sync_every, 1)
        check_aggregation(aggregation, sampling.max_new_tokens)
        compute_advantages(advantage_estimator, torch.zeros(batching.group_size),
                           batching.group_size)
        number_in("max_grad_norm", max_grad_norm, 0.0)
        self.penalties: list[Penalty] = list(penalties or [])
        for penalty in self.penalties:
            if not isinstance(penalty, Penalty):
                raise ValueError(f"every penalty must be a trustregion.penalties.Penalty; got "
                                 f"{type(penalty).__name__}")

        self.routing_replay = boolean("routing_replay", routing_replay)
        self.prefix_sharing = PrefixSharing(boolean("prefix_sharing", prefix_sharing))
        self.policy, self.tokenizer = load_model(policy)
        if routing_replay:
            check_routing_replay(self.policy)
        prepare_tokenizer(self.tokenizer, policy, pad_token=pad_token,
                          chat_template=chat_template)
        # The policy's log-probs must be those of the distribution the behaviour sampled from:
        # eval mode turns off dropout and router noise (GPT-2 ships with dropout 0.1), which
        # would otherwise look like drift; gradients flow as usual.
        self.policy.eval()
        dropout = configured_dropout(self.policy.config)
        if dropout:
            listed = ", ".join(f"{name}={value:g}" for name, value in dropout.items())
            rank_zero_warn(
                f"the policy's config sets dropout ({listed}), but the policy trains with "
                "dropout off (eval mode) so that its recomputed log-probs match the behaviour's; "
                "set these to 0 in the model's config to silence this warning")
        self.precision = precision
        self.behavior: PreTrainedModel = low_precision_copy(
            self.policy, precision.behavior, compute=precision.compute,
            quantize_lm_head=precision.quantize_lm_head, setting="precision.behavior")
        self.reference: PreTrainedModel | None = None
        if any(p.needs_reference for p in self.penalties):
            self.reference = low_precision_copy(
                self.policy if reference is None else load_model(reference)[0],
                precision.reference, compute=precision.compute,
                quantize_lm_head=precision.quantize_lm_head, setting="precision.reference")
        if precision.policy == "fp8":
            enable_fp8_training(self.policy, quantize_lm_head=precision.quantize_lm_head)

        self.sampling = sampling
        self.batching = batching
        self.sync_every = sync_every
        self.advantage_estimator: AdvantageEstimator = advantage_estimator
        self.aggregation: AggregationMode = aggregation
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._check_optimizer()
        self.max_grad_norm = max_grad_norm
        self.chat_template = chat_template
        self.seed = run_seed(seed)
        self._save_config_form()
        self.steps_since_sync = 0
        self.next_prompt_batch = 0
        self._record_topk = 0
        self._step_log = StepLog()
        self._unknown_tokens_reported = False
        self._resumed_hparams: dict[str, Any] | None = None
        self._evaluation_totals: EvaluationTotals | None = None
        self._prediction: tuple[PredictionSettings, list[PromptLine]] | None = None

    def _check_optimizer(self) -> None:
        """Build the optimiser and scheduler once on the policy's parameters, so a bad setting
        fails at construction, not at the first step."""
        try:
            optimizer = self.optimizer_factory(self.policy.parameters())
        except (TypeError, ValueError) as err:
            raise ValueError(f"the optimizer could not be built on the policy's parameters: "
                             f"{err}") from err
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
                raise ValueError(f"the optimizer's learning rate must be a finite number > 0; "
                                 f"got {lr!r}")
        try:
            self.lr_scheduler_factory(optimizer)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the lr_scheduler could not be built: {err}") from err

    def _save_config_form(self) -> None:
        """Hyperparameters in their config form, so ``hparams.yaml`` shows every setting and
        ``trustregion fit --ckpt_path`` rebuilds the run as configured."""
        self.save_hyperparameters(ignore=["trust_region", "task", "sampling", "precision",
                                          "batching", "evaluation", "penalties"])
        given = dict(self.hparams)
        self.save_hyperparameters({
            **given,
            "trust_region": to_spec(self.trust_region),
            "task": to_spec(self.task),
            "sampling": asdict(self.sampling),
            "precision": asdict(self.precision),
            "batching": asdict(self.batching),
            "evaluation": self.evaluation.config() if self.evaluation is not None else None,
            "penalties": [_penalty_spec(p) for p in self.penalties] or None,
            "optimizer": _callable_spec(given.get("optimizer", self.optimizer_factory)),
            "lr_scheduler": _callable_spec(given.get("lr_scheduler",
                                                     self.lr_scheduler_factory)),
            "seed": self.seed,
        })

    # ------------------------------------------------------------ interface for callbacks
    @property
    def strategy(self) -> TrustRegionStrategy:
        """The trust-region strategy being trained with."""
        return self.trust_region

    @property
    def step_log(self) -> StepLog:
        """The current rollout batch's logger row and progress-bar values."""
        return self._step_log

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimiser steps one rollout batch makes, each counted in ``trainer.global_step``:
        ``ppo_epochs`` × ⌈group_size · prompts_per_step / mini_batch_size⌉."""
        return self.batching.optimizer_steps_per_rollout

    @property
    def behavior_topk(self) -> int:
        """Top-K behaviour log-probs recorded per token: what the strategy needs, or more when
        a callback asked (:meth:`request_behavior_topk`)."""
        return max(self.trust_region.behavior_topk, self._record_topk)

    def request_behavior_topk(self, k: int) -> None:
        """Record at least ``k`` top-K behaviour log-probs per token from now on (for callbacks
        that evaluate other strategies on the same tokens)."""
        integer_at_least("k", k, 0)
        self._record_topk = max(self._record_topk, k)

    def training_state(self) -> dict[str, Any]:
        """Everything that undoing an iteration must restore: the policy's parameters and
        buffers, the behaviour model's state (its ``state_dict``, which holds a quantised
        model's scales too), every optimiser's and scheduler's state, and the behaviour-sync
        counter. Tensors are the live ones; copy before keeping. The prompt position and the
        trainer's step counter are not part of it (an undone iteration still counts)."""
        return {
            "models": {"policy": {**dict(self.policy.named_parameters()),
                                  **dict(self.policy.named_buffers())},
                       "behavior": self.behavior.state_dict(keep_vars=True)},
            "optimizers": [o.state_dict() for o in self._optimizers()],
            "schedulers": [s.state_dict() for s in self._schedulers()],
            "counters": {"steps_since_sync": self.steps_since_sync},
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`training_state`: weights are copied in place, optimiser and
        scheduler states loaded (they adopt the given tensors), counters set."""
        with torch.no_grad():
            live = {**dict(self.policy.named_parameters()),
                    **dict(self.policy.named_buffers())}
            for key, value in state["models"]["policy"].items():
                live[key].copy_(value)
            self.behavior.load_state_dict(state["models"]["behavior"])
        for optimizer, saved in zip(self._optimizers(), state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self._schedulers(), state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        self.steps_since_sync = int(state["counters"]["steps_since_sync"])

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = self.optimizers(use_pl_optimizer=False)
        return list(optimizers) if isinstance(optimizers, list | tuple) else [optimizers]

    def _schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, list | tuple) else [schedulers]

    # ----------------------------------------------------------------------------- data
    def train_dataloader(self) -> PromptStream:
        """This process's share of every prompt batch, from the next batch of the run on."""
        return PromptStream(self.task, self.batching.prompts_per_step, seed=self.seed,
                            start=self.next_prompt_batch, rank=self.trainer.global_rank,
                            world_size=self.trainer.world_size)

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int) -> Any:
        return batch  # prompts are text; tensors are made on the right device later

    # ---------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.policy.parameters())
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            self._check_sharded_run()
        self.batching.check_world_size(self.trainer.world_size)
        # before Lightning casts the module for a "*-true" precision
        check_trainer_precision(str(self.trainer.precision), self.precision,
                                has_reference=self.reference is not None)
        if stage == "fit":
            check_schedule(self.evaluation,
                           val_check_interval=self.trainer.val_check_interval,
                           check_val_every_n_epoch=self.trainer.check_val_every_n_epoch,
                           limit_val_batches=self.trainer.limit_val_batches)
        if stage == "validate":
            if self.evaluation is None:
                raise ValueError("validating needs evaluation settings: set model.evaluation "
                                 "(for example {prompts: 64}); see docs/evaluation.md")
            check_every_prompt_scored(self.trainer.limit_val_batches)
        if stage == "predict":
            if self.trainer.world_size != 1:
                raise PredictionRefused(
                    f"trustregion predict runs on one process; got {self.trainer.world_size} "
                    "(set trainer.devices: 1 and trainer.num_nodes: 1)")
            require(self._prediction is not None,
                    "predicting needs prompts: call prepare_prediction(prompts, settings) "
                    "first (trustregion predict does, from --prediction.prompts)")

    def _check_sharded_run(self) -> None:
        """Refuse what FSDP (``ModelParallelStrategy``) cannot run: one process and tensor
        parallelism."""
        mesh = self.device_mesh
        check_fsdp_layout(self.trainer.world_size,
                          mesh["tensor_parallel"].size() if mesh is not None else 1)

    def configure_model(self) -> None:
        """With several processes, check that every process built the same models; under
        Lightning's ``ModelParallelStrategy``, then shard the policy with FSDP2 (see
        :mod:`trustregion.sharding`).

        The behaviour and reference models stay replicated, a whole copy on every process: the
        behaviour model is the inference engine each process samples its own prompts with, and
        the reference is frozen; both only run forward. Every process must have built the same
        models (pretrained weights, or a seeded run): DDP broadcasts only the policy's
        parameters and buffers, not a quantised model's scales, and FSDP broadcasts nothing, so
        models whose weights differ between processes are refused here, before anything is
        sharded. Lightning may call this hook more than once (each ``fit``, ``validate``): a
        policy that is sharded already is left as it is; ``load_from_checkpoint``, outside any
        run, calls it with no trainer, and nothing is done.
        """
        try:
            trainer = self.trainer
        except RuntimeError:  # load_from_checkpoint builds models outside any run
            return
        if trainer.world_size <= 1 or is_sharded(self.policy):
            return
        mesh = self.device_mesh
        group = mesh["data_parallel"].get_group() if mesh is not None else None
        differing = differing_models(
            {"policy": self.policy, "behavior": self.behavior, "reference": self.reference},
            group, device=trainer.strategy.root_device)
        require(not differing,
                f"the processes built different {' and '.join(differing)} weights (a random "
                "initialisation without a seed?); seed the run (seed_everything, or "
                "L.seed_everything before building the module) or load pretrained weights, so "
                "that every process starts from the same models")
        if mesh is not None:
            shard_model(self.policy, mesh["data_parallel"])

    def on_train_start(self) -> None:
        # Lightning restores the optimiser and scheduler before this hook, with the settings
        # they were saved with: an optimiser or scheduler setting configured differently since
        # takes effect here.
        if self._resumed_hparams is not None:
            apply_changed_settings(self._resumed_hparams, self.hparams, self._optimizers(),
                                   self._schedulers())
            self._resumed_hparams = None

    def on_fit_start(self) -> None:
        rank_zero_info(self.precision_summary())
        # A dataset's prompts are all checked before the first rollout, so a long one drawn late
        # cannot end a run hours in; generated tasks are checked batch by batch.
        examples = self.task.all_examples()
        if examples:
            self._check_prompts([ex.prompt for ex in examples],
                                source=f"the examples of task {self.task.name!r}")
        endless = unbounded_run_warning(self.trainer, self.optimizer_steps_per_rollout)
        if endless is not None:
            rank_zero_warn(endless)

    def precision_summary(self) -> str:
        """Each model's precision and, with FP8 models, whether their matmuls run in FP8 on
        this device or are emulated; logged once when training starts."""
        fp8_models = [m for m, p in ((self.behavior, self.precision.behavior),
                                     (self.reference, self.precision.reference))
                      if m is not None and p == "fp8"]
        return precision_summary(
            str(self.trainer.precision), self.precision, has_reference=self.reference is not None,
            fp8_paths=describe_fp8_paths(fp8_models[0], self.device) if fp8_models else None)

    # ---------------------------------------------------------------------------- steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        """One RL iteration; returns a :class:`~trustregion.interface.StepOutput` for callbacks
        (read it with ``StepOutput.of(outputs)``)."""
        self.step_log.start(self.trainer, batch.index)
        self.next_prompt_batch = batch.index + 1
        rollout, stats = self.rollout(batch)
        records, token_metrics = self.update(rollout, batch.index)
        metrics = self.step_metrics(stats, token_metrics)
        self.step_log.add(metrics, write=self.step_log.logging_batch(batch_idx))
        self.step_log.show({"reward": metrics["reward/mean"], "loss": metrics["train/loss"]})
        step = StepOutput(rollout=rollout, stats=stats, updates=tuple(records), metrics=metrics)
        return step.as_training_step_output()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning runs this after every callback's on_train_batch_end (its documented hook
        # order), so the row holds the callbacks' values too.
        self.step_log.finish(self)

    def on_train_end(self) -> None:
        self.step_log.finish(self)

    # ----------------------------------------------------------------------- evaluation
    def val_dataloader(self) -> ValidationBatches:
        """The held-out prompts in batches of ``evaluation.batch_size``; every process gets
        every batch and scores its share (none without evaluation settings)."""
        if self.evaluation is None:
            # Empty on purpose; Lightning would warn that it is empty right after this returns.
            warnings.filterwarnings("ignore", message=r"Total length of `ValidationBatches` "
                                                      r"across ranks is zero")
            return ValidationBatches([])
        self._check_prompts([ex.prompt for ex in self.validation_examples],
                            source=f"the held-out examples of task {self.task.name!r}",
                            max_new_tokens=self._evaluation_max_new_tokens)
        return validation_batches(self.validation_examples, self.evaluation.batch_size)

    @property
    def _evaluation_max_new_tokens(self) -> int:
        assert self.evaluation is not None
        return self.evaluation.max_new_tokens or self.sampling.max_new_tokens

    def on_validation_epoch_start(self) -> None:
        assert self.evaluation is not None
        self._evaluation_totals = EvaluationTotals(self.evaluation)

    def validation_step(self, batch: ValidationBatch, batch_idx: int) -> None:
        """Score the policy on this process's share of ``batch``; with the policy sharded
        (FSDP), every process generates in lockstep, a process without a prompt in ``batch``
        included (see :func:`~trustregion.evaluation.evaluate_share`)."""
        assert self.evaluation is not None and self._evaluation_totals is not None
        evaluate_share(
            self.policy, self.tokenizer, self.task, batch, self.evaluation,
            self._evaluation_totals, max_new_tokens=self._evaluation_max_new_tokens,
            seed=self.seed, rank=self.trainer.global_rank, world_size=self.trainer.world_size,
            synced=is_sharded(self.policy), chat_template=self.chat_template)

    def on_validation_epoch_end(self) -> None:
        """Log the evaluation's values, over every process, at the index of the last trained
        rollout batch (0 before any); the sanity check before training logs nothing."""
        assert self._evaluation_totals is not None
        metrics = self._evaluation_totals.metrics(self._reduce(), self.device)
        self._evaluation_totals = None
        if self.trainer.sanity_checking:
            return
        self.step_log.write(self.trainer, metrics, step=max(self.next_prompt_batch - 1, 0))

    # ----------------------------------------------------------------------- prediction
    def prepare_prediction(self, prompts: Sequence[PromptLine],
                           settings: PredictionSettings) -> None:
        """Complete ``prompts`` with ``settings`` at the next ``trainer.predict``; prompts too
        long for the context with the completion length are refused here."""
        if not isinstance(settings, PredictionSettings):
            raise ValueError(f"settings must be a PredictionSettings; got "
                             f"{type(settings).__name__}")
        max_new_tokens = settings.max_new_tokens or self.sampling.max_new_tokens
        self._check_prompts([p.prompt for p in prompts],
                            source=f"the prompts of {settings.prompts}",
                            max_new_tokens=max_new_tokens)
        self._prediction = (settings, list(prompts))

    def predict_dataloader(self) -> PredictionBatches:
        """The prompts given to :meth:`prepare_prediction`, ``batch_size`` at a time."""
        assert self._prediction is not None  # setup("predict") refuses without them
        settings, prompts = self._prediction
        return prediction_batches(prompts, settings.batch_size)

    def predict_step(self, batch: PredictionBatch, batch_idx: int) -> list[Completion]:
        """The policy's completions of one batch of prompts, prompt by prompt; sampled ones are
        drawn from a generator seeded by the module's seed and the batch's index, so the same
        settings give the same completions."""
        assert self._prediction is not None
        settings, _ = self._prediction
        repeats = settings.completions_per_prompt
        with seeded(batch_seed(self.seed, batch.index), self.device):
            texts = generate_completions(
                self.policy, self.tokenizer, [p.prompt for p in batch.prompts],
                samples=settings.samples, greedy=settings.greedy,
                temperature=settings.temperature, top_p=settings.top_p,
                max_new_tokens=settings.max_new_tokens or self.sampling.max_new_tokens,
                chat_template=self.chat_template)
        return [Completion(line=p.line, prompt=p.prompt, sample=s,
                           completion=texts[i * repeats + s])
                for i, p in enumerate(batch.prompts) for s in range(repeats)]

    def rollout(self, batch: PromptBatch) -> tuple[Rollout, RolloutStats]:
        """Sample and score ``batch``: this process's share of the prompts (the prompt stream
        holds only that share, whole prompts, so a group never spans processes)."""
        examples = list(batch.examples)
        prompts = [ex.prompt for ex in examples]
        # each prompt is tokenised once per rollout: the checks and the sampler share it
        encoded = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template)
        if self.task.all_examples() is None:  # a dataset was checked whole in on_fit_start
            self._check_prompts(prompts, source=f"prompt batch {batch.index}", encoded=encoded)
        seed = derive_seed(self.seed, 2 * batch.index)
        if self.trainer.world_size > 1:
            seed = derive_seed(seed, self.trainer.global_rank + 1)
        with seeded(seed, self.device):
            rollout = self.sample(examples, encoded=encoded)
        return self.score(rollout)

    def sample(self, examples: Sequence[Any],
               encoded: tuple[Tensor, Tensor] | None = None) -> Rollout:
        """``group_size`` completions per example from the behaviour model, at its own
        precision (outside the trainer's autocast); ``encoded`` is the examples' prompts
        already encoded, one row per example (:func:`~trustregion.rollout.encode_prompts`),
        or None to encode them here."""
        with self._own_precision():
            return generate_rollout(
                self.behavior, self.tokenizer, examples, group_size=self.batching.group_size,
                sampling=self.sampling, topk=self.behavior_topk,
                chat_template=self.chat_template, record_routing=self.routing_replay,
                encoded=encoded)

    def _own_precision(self) -> Any:
        """A context in which the behaviour and reference models compute at their own
        precision: the trainer's autocast (``bf16-mixed``) switched off."""
        return torch.autocast(self.device.type, enabled=False)

    def score(self, rollout: Rollout) -> tuple[Rollout, RolloutStats]:
        """Rewards, old and reference log-probs if needed, in-reward penalties, advantages."""
        rollout.rewards = self.task.reward(rollout.completions, rollout.examples).to(self.device)
        with torch.no_grad():
            if self.trust_region.anchor == "old":
                rollout.old_logp = self._completion_logp(self.policy, rollout)
            if self.reference is not None:
                with self._own_precision():
                    rollout.ref_logp = self._completion_logp(self.reference, rollout)
        penalty: Tensor | None = None
        for term in self.penalties:
            if term.in_reward:
                amount = term.reward_penalty(rollout.behavior_logp, rollout.ref_logp,
                                             rollout.completion_mask)
                penalty = amount if penalty is None else penalty + amount
        shaped = rollout.rewards if penalty is None else rollout.rewards - penalty
        advantages = compute_advantages(self.advantage_estimator, shaped,
                                        self.batching.group_size)
        rollout.advantages = advantages.values
        groups = len(rollout) // self.batching.group_size
        stats = RolloutStats(rewards=rollout.rewards, lengths=rollout.lengths,
                             zero_std_groups=advantages.frac_reward_zero_std * groups,
                             groups=groups, reward_penalty=penalty)
        return rollout, stats

    def update(self, rollout: Rollout, index: int
               ) -> tuple[list[UpdateRecord], dict[str, Tensor]]:
        """``ppo_epochs`` passes of optimiser steps over shuffled mini-batches of ``rollout``.
        Returns the update records and the step's training values, reduced across ranks."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        assert isinstance(optimizer, LightningOptimizer)
        _, mini_size, micro_size = self.batching.per_rank(self.trainer.world_size)
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, 2 * index + 1))
        records: list[UpdateRecord] = []
        token_metrics = MetricAccumulator()
        step_losses, grad_norms = [], []
        # With prefix sharing, a mini-batch's rows are ordered by prompt and completion length
        # before it is split, so that micro-batches share prompts and lengths; the loss is the
        # same, since it is aggregated with the whole step's counts.
        grouping = (sharing_order(rollout.prompt_ids, rollout.prompt_mask,
                                  rollout.completion_mask).to(self.device)
                    if self.prefix_sharing.enabled and micro_size < mini_size else None)
        for _ in range(self.batching.ppo_epochs):
            order = torch.randperm(len(rollout), generator=shuffle).to(self.device)
            for mini_index in order.split(mini_size):
                if grouping is not None:
                    mini_index = mini_index[grouping[mini_index].sort(stable=True).indices]
                micro_batches = [rollout.select(i) for i in mini_index.split(micro_size)]
                counts = self._global_counts([m.completion_mask for m in micro_batches])
                step_loss = torch.zeros((), device=self.device)
                for position, micro in enumerate(micro_batches):
                    # Gradients stay local until the step's last micro-batch, whose backward
                    # synchronises everything accumulated: one exchange per optimiser step.
                    last = position == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else \
                            gradient_sync_skipped(self.trainer.strategy, self.policy):
                        loss, record, metrics = self._micro_step(micro, counts)
                        # Data-parallel gradients are averaged over ranks; the counts are
                        # global, so each rank's loss is its share of the step's loss: undo
                        # the average.
                        self.manual_backward(loss * self.trainer.world_size)
                    records.append(record)
                    token_metrics.add(metrics, record.batch.mask,
                                      record.batch.token_advantages())
                    step_loss = step_loss + loss.detach()
                step_losses.append(step_loss)
                grad_norms.append(self._clip_and_step(optimizer, scheduler))
        reduce = self._reduce()
        metrics = token_metrics.compute(reduce)
        sums, _, _ = reduce_across_ranks(reduce, {"loss": torch.stack(step_losses).sum()})
        norms = torch.stack(grad_norms)
        finite = norms.isfinite()
        metrics["train/loss"] = (sums["loss"] / len(step_losses)).float()
        metrics["train/grad_norm"] = norms[finite].mean() if finite.any() \
            else torch.tensor(float("nan"))
        metrics["train/skipped_steps"] = (~finite).sum().float()
        return records, metrics

    def step_metrics(self, stats: RolloutStats, token_metrics: Mapping[str, Tensor]
                     ) -> dict[str, Tensor]:
        """The module's values of one rollout batch, over every rank: reward, response
        length, learning rate and the update's values."""
        sums = {"n": torch.tensor(float(len(stats.rewards))),
                "reward": stats.rewards.double().sum(),
                "reward_sq": stats.rewards.double().square().sum(),
                "zero_std_groups": torch.as_tensor(stats.zero_std_groups).double(),
                "groups": torch.tensor(float(stats.groups)),
                "length": stats.lengths.double().sum()}
        if stats.reward_penalty is not None:
            sums["penalty"] = stats.reward_penalty.double().sum()
        sums = {k: v.to(self.device) for k, v in sums.items()}
        sums, maxima, _ = reduce_across_ranks(
            self._reduce(), sums, {"length_max": stats.lengths.max().to(self.device).double()})
        n = sums["n"]
        mean = sums["reward"] / n
        variance = (sums["reward_sq"] - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)
        metrics = {
            "reward/mean": mean,
            "reward/std": variance.sqrt(),
            "reward/frac_zero_std": sums["zero_std_groups"] / sums["groups"].clamp(min=1),
            **({"reward/penalty": sums["penalty"] / n} if "penalty" in sums else {}),
            "response/length_mean": sums["length"] / n,
            "response/length_max": maxima["length_max"],
            "train/lr": torch.tensor(optimizer.param_groups[0]["lr"]),
            **token_metrics,
        }
        return {k: v.detach().float().to(self.device) for k, v in metrics.items()}

    def _reduce(self) -> Reduce | None:
        """Cross-rank reduction through the trainer's strategy (None on one process)."""
        if self.trainer.world_size <= 1:
            return None
        strategy = self.trainer.strategy
        return lambda tensor, op: strategy.reduce(tensor, reduce_op=op)

    def _global_counts(self, masks: list[Tensor]) -> StepCounts:
        """Token and sequence counts of one optimiser step, summed over micro-batches and
        ranks."""
        return step_counts(masks, reduce=self._reduce())

    def _clip_and_step(self, optimizer: LightningOptimizer, scheduler: Any) -> Tensor:
        """Clip gradients and step. A non-finite gradient is dropped first, so a NaN or inf never
        reaches the weights or the optimiser's moments; the (empty) step still counts towards
        ``max_steps``. Returns the pre-clip norm, of the whole gradient when the policy is
        sharded (the same on every process)."""
        grad_norm = clip_grad_norm(self.policy.parameters(), self.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are skipped
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        self._after_optimizer_step()
        return grad_norm.detach()

    def _micro_step(self, micro: Rollout, counts: StepCounts
                    ) -> tuple[Tensor, UpdateRecord, dict[str, Tensor]]:
        logits = self._token_logits(self.policy, micro, count=True)
        logp = logits.token_logprobs(micro.completion_ids)
        if any(p.needs_entropy_grad for p in self.penalties):
            entropy = logits.entropy()
        else:
            with torch.no_grad():
                entropy = logits.detached().entropy()
        topk_logp = None
        if micro.topk_ids is not None:
            with torch.no_grad():
                topk_logp = logits.detached().gather(micro.topk_ids)
        assert micro.advantages is not None
        batch = TokenBatch(
            logp=logp, behavior_logp=micro.behavior_logp, advantages=micro.advantages,
            mask=micro.completion_mask, old_logp=micro.old_logp, ref_logp=micro.ref_logp,
            entropy=entropy, topk_logp=topk_logp, topk_behavior_logp=micro.topk_behavior_logp)
        output = self.trust_region(batch)
        token_loss = output.token_loss
        metrics = dict(output.metrics)
        for penalty in self.penalties:
            if penalty.in_reward:
                continue
            term = penalty(batch)
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
        _, _, micro = self.batching.per_rank(self.trainer.world_size)
        parts = []
        for index in torch.arange(len(rollout), device=self.device).split(micro):
            part = rollout.select(index)
            parts.append(self._token_logits(model, part).token_logprobs(part.completion_ids))
        return torch.cat(parts)

    def _token_logits(self, model: PreTrainedModel, rollout: Rollout, *,
                      count: bool = False) -> TokenLogits:
        """``model``'s logits predicting ``rollout``'s completion tokens at the sampling
        temperature, through the shared-prefix forward where it applies
        (:mod:`trustregion.prefix_sharing`); the policy replays the recorded routing with
        ``routing_replay``. ``count``: add the forward passes' positions to
        :attr:`update_positions`."""
        routing = None
        if self.routing_replay and model is self.policy:
            require(rollout.routing is not None,
                    "routing_replay needs rollouts with a routing record (generate_rollout(..., "
                    "record_routing=True))")
            routing = rollout.routing
        return self.prefix_sharing.logits(
            model, rollout, temperature=self.sampling.temperature, routing=routing, count=count,
            full_forward=lambda m, r: completion_logits(m, r))

    @property
    def update_positions(self) -> PositionCount:
        """Positions that the policy's forward passes with gradient (the update's micro-batches)
        processed on this process since the module was built, and how many of them were
        padding (``padding_fraction``): left-padding of prompts and completion positions after
        a row's last token. Old and reference log-probs are not counted."""
        return self.prefix_sharing.counted

    def _after_optimizer_step(self) -> None:
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.sync_every:
            self.sync_behavior()

    def sync_behavior(self) -> None:
        """Send the policy's current weights to the behaviour model, the way an inference
        engine receives them: gathered whole from every process when the policy is sharded,
        then cast or re-quantised to the behaviour's precision
        (:func:`~trustregion.precision.load_weights`)."""
        load_weights(self.behavior, full_state_dict(self.policy))
        self.steps_since_sync = 0

    # -------------------------------------------------------------------------- helpers
    def _check_prompts(self, prompts: list[str], *, source: str,
                       max_new_tokens: int | None = None,
                       encoded: tuple[Tensor, Tensor] | None = None) -> None:
        """Refuse empty prompts and prompts too long for the context; warn, once per run, of
        prompts holding text the tokenizer encodes as its unknown token
        (:mod:`trustregion.prompt_checks`). ``source`` names the prompts in messages;
        ``encoded`` is the prompts as the rollout encodes them (one row each), used instead
        of encoding them again."""
        check_prompt_text(prompts, source=source)
        if not self._unknown_tokens_reported and self._may_hold_unknown_tokens(encoded):
            unknown = unknown_tokens(self.tokenizer, prompts)
            if unknown is not None:
                rank_zero_warn(unknown.message(source, str(self.tokenizer.unk_token)))
                self._unknown_tokens_reported = True
        lengths = None if encoded is None else encoded[1].sum(-1).tolist()
        self._check_prompt_lengths(prompts, max_new_tokens or self.sampling.max_new_tokens,
                                   lengths=lengths)

    def _may_hold_unknown_tokens(self, encoded: tuple[Tensor, Tensor] | None) -> bool:
        """False when ``encoded`` prompts hold no unknown token, so the prompts need not be
        encoded again to look for one; True without ``encoded``."""
        if encoded is None:
            return True
        unk = self.tokenizer.unk_token_id
        others = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                  self.tokenizer.pad_token_id}
        if unk is None or unk in others:
            return False  # unknown_tokens reports nothing for such a tokenizer
        ids, mask = encoded
        return bool((ids[mask.bool()] == unk).any())

    def _check_prompt_lengths(self, prompts: list[str], max_new_tokens: int, *,
                              lengths: list[int] | None = None) -> None:
        """Refuse prompts that leave no room for ``max_new_tokens`` in the policy's context,
        counting tokens as the rollout encodes them (chat template included); ``lengths`` are
        those counts when already known."""
        context = getattr(self.policy.config, "max_position_embeddings", None)
        if context is None or not prompts:
            return
        if lengths is None:
            lengths = prompt_lengths(self.tokenizer, prompts, chat_template=self.chat_template)
        longest = max(range(len(prompts)), key=lengths.__getitem__)
        if lengths[longest] + max_new_tokens > context:
            template = " with the chat template" if self.chat_template else ""
            raise ValueError(
                f"a prompt of {lengths[longest]} tokens{template} plus max_new_tokens="
                f"{max_new_tokens} exceeds the model's context of {context} "
                f"tokens ({prompts[longest][:60]!r}...); shorten the prompts or lower "
                "max_new_tokens")

    # ---------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["trustregion"] = {
            "strategy_class": f"{type(self.trust_region).__module__}."
                              f"{type(self.trust_region).__qualname__}",
            "strategy_state": self.trust_region.state_dict(),
            "steps_since_sync": self.steps_since_sync,
            "next_prompt_batch": self.next_prompt_batch,
            "seed": self.seed,
            # resuming on another number of processes is refused (RolloutCheckpoint)
            "world_size": self.trainer.world_size,
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
        recorded = checkpoint.get("hyper_parameters") or {}
        refused = run_defining_differences(recorded, self.hparams)
        if refused:
            raise ResumeRefused(refusal("the checkpoint", refused))
        self._resumed_hparams = dict(recorded)
        self.trust_region.load_state_dict(state["strategy_state"])
        self.steps_since_sync = state["steps_since_sync"]
        self.next_prompt_batch = state["next_prompt_batch"]
