"""The architecture conformance check: it passes on every family :func:`tiny_config` builds and
on the shipped model, each of its checks bites on a model or rollout broken in that one way,
and bad input is refused with a message that says what to do."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import BertConfig, PreTrainedTokenizerFast, T5Config
from transformers.models.gpt2 import modeling_gpt2

import trustregion.module
from trustregion.model_check import MODEL_CHECKS, ModelCheckReport, check_model
from trustregion.models.architectures import ARCHITECTURES, tiny_config
from trustregion.models.tiny import TINY_MODELS
from trustregion.module import TrustRegionModule
from trustregion.rollout import Rollout
from trustregion.testing import check_model as exported_check_model

# Random-init models rarely sample EOS (about 1 token in 47), so the rollouts of the tiny
# models are 3 default prompts × 8 completions of up to 24 tokens: with seed 0 every family
# stops some of them at EOS early.
RANDOM = {"group_size": 8, "max_new_tokens": 24}


def _save(path: Path, tokenizer: PreTrainedTokenizerFast, config: Any) -> str:
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    config.save_pretrained(path)
    return f"config:{path}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory,
            char_tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    """``config:`` sources of a small model of every family (hidden size 32, 2 layers)."""
    root = tmp_path_factory.mktemp("architectures")
    return {arch: _save(root / arch, char_tokenizer,
                        tiny_config(arch, len(char_tokenizer), hidden_size=32,
                                    num_hidden_layers=2, intermediate_size=64))
            for arch in ARCHITECTURES}


def _passes(report: ModelCheckReport, architecture: str) -> None:
    assert report.architecture == architecture
    assert report.passed == list(MODEL_CHECKS)
    assert set(report.max_abs_diff) == {"behavior_logprobs", "padding_invariance",
                                        "update_step", "checkpoint_round_trip"}
    assert report.max_abs_diff["behavior_logprobs"] <= 1e-5
    assert report.max_abs_diff["padding_invariance"] <= 1e-5
    assert report.max_abs_diff["update_step"] <= 1e-5
    assert report.max_abs_diff["checkpoint_round_trip"] == 0.0
    # what the check demands of its rollout: left padding and completions ending early
    assert len(set(report.prompt_lengths)) >= 2
    assert min(report.completion_lengths) < max(report.completion_lengths)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_family_passes(sources, architecture) -> None:
    # gpt2's config keeps its default dropout of 0.1: the check passes only because the policy
    # recomputes its log-probs without dropout, like the behaviour model that sampled, and the
    # module says so.
    expected = pytest.warns(UserWarning, match="the policy trains with dropout off") \
        if architecture == "gpt2" else contextlib.nullcontext()
    with expected:
        report = check_model(sources[architecture], **RANDOM)
    _passes(report, architecture)


def test_the_tiny_gpt2_config_has_dropout() -> None:
    config = tiny_config("gpt2", 47)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.1, 0.1, 0.1)


def test_a_policy_configured_with_dropout_is_warned_about_once(sources) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrustRegionModule(policy=sources["gpt2"])
    dropout = [str(w.message) for w in caught if "dropout" in str(w.message)]
    # GPT-2's three dropouts, sorted by name; summary_first_dropout belongs to a head the
    # language model does not have
    assert dropout == [
        "the policy's config sets dropout (attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1), "
        "but the policy trains with dropout off (eval mode) so that its recomputed log-probs "
        "match the behaviour's; set these to 0 in the model's config to silence this warning"]


@pytest.mark.parametrize("source", ["tiny-char-llama", "tiny-char-gpt2"])
def test_a_policy_without_dropout_is_not_warned_about(source) -> None:
    assert (TINY_MODELS[source] / "config.json").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrustRegionModule(policy=source)
    assert [str(w.message) for w in caught if "dropout" in str(w.message)] == []


def test_the_shipped_model_passes_with_the_default_prompts() -> None:
    report = check_model("tiny-char-llama")
    _passes(report, "llama")
    # The default prompts, seed 0, one each of arithmetic, digit_sort and reverse: "12+13=",
    # "sort:8764=", "rev:cebe=": their characters plus <bos> = 7, 11 and 10 tokens, each for
    # 4 rows (group_size).
    assert report.prompt_lengths == [7] * 4 + [11] * 4 + [10] * 4


def test_check_model_is_part_of_the_testing_harnesses() -> None:
    assert exported_check_model is check_model


def test_importing_the_testing_harnesses_loads_no_trainer() -> None:
    # the strategy checks need neither Lightning nor transformers: the model check's names are
    # imported on first use
    code = ("import sys, trustregion.testing as t; "
            "print(sorted(m for m in ('trustregion.module', 'trustregion.model_check', "
            "'lightning') if m in sys.modules)); "
            "print(t.check_model.__module__, 'trustregion.module' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["[]", "trustregion.model_check True"]


# ------------------------------------------------------------------------- each check bites
def _wrap_rollout(monkeypatch: pytest.MonkeyPatch, change: Callable[[Rollout], None]) -> None:
    """Let ``change`` alter every rollout the module samples."""
    original = trustregion.module.generate_rollout

    def altered(*args: Any, **kwargs: Any) -> Rollout:
        rollout = original(*args, **kwargs)
        change(rollout)
        return rollout

    monkeypatch.setattr(trustregion.module, "generate_rollout", altered)


def test_behaviour_logprobs_off_by_1e_4_fail(sources, monkeypatch) -> None:
    def shift(rollout: Rollout) -> None:
        rollout.behavior_logp = rollout.behavior_logp + 1e-4 * rollout.completion_mask

    _wrap_rollout(monkeypatch, shift)
    with pytest.raises(AssertionError, match=r"behavior_logprobs failed for llama .* differ by "
                                             r"up to 0\.0001.* worst token: row \d+, position"):
        check_model(sources["llama"], **RANDOM)


def test_tokens_after_eos_counted_fail(sources, monkeypatch) -> None:
    def count_everything(rollout: Rollout) -> None:
        rollout.completion_mask = torch.ones_like(rollout.completion_mask)

    _wrap_rollout(monkeypatch, count_everything)
    with pytest.raises(AssertionError, match=r"eos_and_padding failed for qwen3 .* the completion "
                                             r"mask is True, but the first EOS is at position"):
        check_model(sources["qwen3"], **RANDOM)


@pytest.mark.filterwarnings("ignore:the policy's config sets dropout")
def test_a_model_ignoring_position_ids_fails_padding_invariance(sources, monkeypatch) -> None:
    # GPT-2 learns absolute positions; without the position ids it numbers the left padding
    # too, the same way while generating and recomputing, so only a row alone tells.
    original = modeling_gpt2.GPT2LMHeadModel.forward

    def forward(self: Any, *args: Any, position_ids: Any = None, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt2.GPT2LMHeadModel, "forward", forward)
    with pytest.raises(AssertionError, match=r"padding_invariance failed for gpt2 .* worst "
                                             r"token: row \d+, position \d+ .*batched .* alone"):
        check_model(sources["gpt2"], **RANDOM)


def test_a_parameter_without_gradient_fails_update_step(sources, monkeypatch) -> None:
    original = trustregion.module.load_model

    def with_unused_parameter(source: str, **kwargs: Any) -> Any:
        model, tokenizer = original(source, **kwargs)
        model.register_parameter("unused_scale", torch.nn.Parameter(torch.ones(1)))
        return model, tokenizer

    monkeypatch.setattr(trustregion.module, "load_model", with_unused_parameter)
    with pytest.raises(AssertionError, match=r"update_step failed for mistral .* 1 trainable "
                                             r"parameter\(s\) got no usable gradient: "
                                             r"unused_scale \(no gradient\)$"):
        check_model(sources["mistral"], **RANDOM)


def test_a_frozen_parameter_is_not_asked_for_a_gradient(sources, monkeypatch) -> None:
    original = trustregion.module.load_model

    def with_frozen_parameter(source: str, **kwargs: Any) -> Any:
        model, tokenizer = original(source, **kwargs)
        model.register_parameter("frozen_scale",
                                 torch.nn.Parameter(torch.ones(1), requires_grad=False))
        return model, tokenizer

    monkeypatch.setattr(trustregion.module, "load_model", with_frozen_parameter)
    assert check_model(sources["llama"], **RANDOM).passed == list(MODEL_CHECKS)


def test_a_checkpoint_that_changes_a_weight_fails_the_round_trip(sources, monkeypatch) -> None:
    original = TrustRegionModule.on_save_checkpoint

    def perturbed(self: TrustRegionModule, checkpoint: dict[str, Any]) -> None:
        original(self, checkpoint)
        state = checkpoint["state_dict"]
        key = next(k for k in state if k.startswith("policy.") and k.endswith("norm.weight"))
        state[key] = state[key] + 1e-3  # a new tensor: the live weight stays as it was

    monkeypatch.setattr(TrustRegionModule, "on_save_checkpoint", perturbed)
    with pytest.raises(AssertionError, match=r"checkpoint_round_trip failed for llama .* saved "
                                             r"-?\d+\.\d+, loaded"):
        check_model(sources["llama"], **RANDOM)


def test_an_update_computing_other_logprobs_fails_update_step(sources, monkeypatch) -> None:
    # the module's own forward (not the one the earlier checks call) sharpens the logits by
    # 1e-3: the behaviour log-probs still match a plain recomputation, but not the update's
    original = trustregion.module.completion_logits
    monkeypatch.setattr(trustregion.module, "completion_logits",
                        lambda model, rollout: original(model, rollout) * 1.001)
    with pytest.raises(AssertionError, match=r"update_step failed for llama .* the log-probs "
                                             r"the update computed and the behaviour log-probs "
                                             r"differ by up to .* on the first \(on-policy\) "
                                             r"update; worst token: micro-batch \d+, row \d+"):
        check_model(sources["llama"], **RANDOM)


def test_an_update_selecting_misaligned_rows_fails_update_step(sources, monkeypatch) -> None:
    # a row selection that pairs each row's completion with another row's behaviour
    # log-probs; it only shows when the update selects several rows per micro-batch
    original = Rollout.select

    def misaligned(self: Rollout, index: torch.Tensor) -> Rollout:
        part = original(self, index)
        part.behavior_logp = self.behavior_logp[index.flip(0)]
        return part

    monkeypatch.setattr(Rollout, "select", misaligned)
    with pytest.raises(AssertionError, match=r"update_step failed for llama .* differ by up to"):
        check_model(sources["llama"], **RANDOM)


# ------------------------------------------------------------------- rollouts that prove nothing
def test_prompts_of_one_length_are_refused(sources) -> None:
    with pytest.raises(AssertionError, match=r"behavior_logprobs failed for llama .* every "
                                             r"prompt takes 3 tokens, so no row is left-padded; "
                                             r"pass prompts of clearly different lengths"):
        check_model(sources["llama"], prompts=["ab", "cd"], **RANDOM)  # 2 characters + <bos>


def test_a_rollout_without_early_eos_is_refused(sources) -> None:
    # 2 completions per prompt of at most 2 tokens: seed 0 samples no EOS at all.
    with pytest.raises(AssertionError, match=r"no completion stopped at EOS before the others "
                                             r"\(lengths \[2, 2, 2, 2, 2, 2\], "
                                             r"max_new_tokens=2\).*raise max_new_tokens"):
        check_model(sources["llama"], group_size=2, max_new_tokens=2)


# ------------------------------------------------------------------------------- bad input
def test_an_encoder_decoder_is_not_a_causal_lm(tmp_path, char_tokenizer) -> None:
    source = _save(tmp_path, char_tokenizer,
                   T5Config(vocab_size=len(char_tokenizer), d_model=16, d_ff=32, num_layers=1,
                            num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match=r"is a 't5' model, not a causal language model.*"
                                         r"for example a llama, qwen3, mistral, gpt2 or phi"):
        check_model(source)


@pytest.mark.filterwarnings("ignore:the policy's config sets dropout")
def test_a_bidirectional_encoder_is_not_a_causal_lm(tmp_path, char_tokenizer) -> None:
    # transformers builds BERT with a language-model head for AutoModelForCausalLM, but
    # without is_decoder its attention looks at later tokens too.
    source = _save(tmp_path, char_tokenizer,
                   BertConfig(vocab_size=len(char_tokenizer), hidden_size=16,
                              num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32))
    with pytest.raises(ValueError, match=r"\(bert\) is not a causal language model: its "
                                         r"prediction at a position depends on the tokens "
                                         r"after it.*set is_decoder: true"):
        check_model(source)


def test_a_tokenizer_without_pad_token_needs_pad_token(tmp_path, char_tokenizer) -> None:
    tokenizer = build_tokenizer_without_pad(char_tokenizer)
    source = _save(tmp_path, tokenizer,
                   tiny_config("llama", len(char_tokenizer), hidden_size=32,
                               num_hidden_layers=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"check_model could not build the training module "
                                         r"for 'config:.*': the tokenizer of .* has no pad "
                                         r"token.*set pad_token \(for example to the "
                                         r"tokenizer's eos token '<eos>'\)"):
        check_model(source, **RANDOM)
    # the cure the message names
    assert check_model(source, pad_token="<eos>", **RANDOM).passed == list(MODEL_CHECKS)


def build_tokenizer_without_pad(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    # A fresh backend: one that has encoded a padded batch keeps its padding, pad token included.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    copy = PreTrainedTokenizerFast(tokenizer_object=backend,
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left", model_max_length=64,
                                   clean_up_tokenization_spaces=False)
    assert copy.pad_token is None
    return copy


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_size": 1}, r"group_size must be an integer ≥ 2; got 1"),
    ({"max_new_tokens": 1}, r"max_new_tokens must be an integer ≥ 2 .*; got 1"),
    ({"pad_token": ""}, r"pad_token must be a non-empty string"),
    ({"tolerance": 0.0}, r"tolerance must be a finite number in \(0\.0, 1\.0\] .*; got 0\.0"),
    ({"prompts": "12+7="}, r"prompts must be a list of at least 2 non-empty strings"),
    ({"prompts": ["12+7=", ""]}, r"prompts must be a list of at least 2 non-empty strings"),
    ({"prompts": ["9" * 40, "1+1="]},
     r"the longest prompt takes 41 tokens; with max_new_tokens=24 it exceeds the model's "
     r"context of 64 tokens"),
])
def test_bad_arguments_are_refused(sources, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_model(sources["llama"], **{**RANDOM, **kwargs})
