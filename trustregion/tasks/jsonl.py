"""A task read from a JSON Lines file of prompts and answers.

The file is UTF-8 (a byte-order mark at its start is skipped). Each non-blank line is a JSON
object; two of its keys hold the prompt and the answer (names set by ``prompt_key`` /
``answer_key``), every other key is kept in :attr:`Example.meta` for custom reward functions::

    {"prompt": "What is 2+3? ", "answer": "5", "difficulty": 1}

:func:`load_jsonl_prompts` reads a file of prompts alone (``trustregion predict``) the same way.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustregion.tasks.base import SPLITS, Split, Task, validation_share
from trustregion.tasks.example import Example
from trustregion.tasks.rewards import RewardFn, exact_match, load_reward_fn
from trustregion.validation import non_empty_string, one_of, require

__all__ = ["UTF8_BOM", "JsonlTask", "PromptLine", "load_jsonl_examples", "load_jsonl_prompts"]

UTF8_BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some editors write at the start of a file; it is skipped."""


@dataclass(frozen=True)
class PromptLine:
    """A prompt read from a JSONL file and the number of the line holding it (1-based)."""

    line: int
    prompt: str


def load_jsonl_examples(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer"
) -> list[Example]:
    """Read every example of a JSONL file.

    Numeric answers are turned into strings (``19`` → ``"19"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a line is not valid UTF-8, not valid JSON or not an object, a key is
            missing, a value has the wrong type, a prompt is empty (or only whitespace), or the
            file holds no examples; the message gives the file and line number.
    """
    examples: list[Example] = []
    for where, _, record in _records(path, "JSONL task file"):
        for key in (prompt_key, answer_key):
            _require_key(record, key, where, "set prompt_key / answer_key to the fields "
                                             "holding the prompt and answer")
        prompt = _prompt(record.pop(prompt_key), prompt_key, where)
        answer = record.pop(answer_key)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise ValueError(
                f"{where}: {answer_key!r} must be a string or a number; got "
                f"{type(answer).__name__} (put structured data in another key: it reaches "
                f"reward functions as Example.meta)"
            )
        examples.append(Example(prompt=prompt, answer=answer, meta=record))
    if not examples:
        raise ValueError(f"JSONL task file holds no examples: {Path(path).expanduser()}")
    return examples


def load_jsonl_prompts(path: str | Path, prompt_key: str = "prompt") -> list[PromptLine]:
    """Read the prompt of every line of a JSONL prompt file (other keys are ignored), read as
    :func:`load_jsonl_examples` reads a task file: UTF-8, a byte-order mark at the start
    skipped, blank lines skipped.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a line is not valid UTF-8, not valid JSON or not an object, its prompt is
            missing, not a string or empty, or the file holds no prompts; the message gives the
            file and line number.
    """
    prompts = []
    for where, number, record in _records(path, "JSONL prompt file"):
        _require_key(record, prompt_key, where, "each line needs the prompt to complete")
        prompts.append(PromptLine(number, _prompt(record[prompt_key], prompt_key, where)))
    if not prompts:
        raise ValueError(f"JSONL prompt file holds no prompts: {Path(path).expanduser()}")
    return prompts


def _records(path: str | Path, kind: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(file:line, line, object)`` for every non-blank line of the JSONL file ``path`` (a ``kind``
    in messages)."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{kind} {what}: {path}")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            line = _decode_line(raw.removeprefix(UTF8_BOM) if number == 1 else raw, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno})"
                ) from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: each line must be a JSON object; got {type(record).__name__}"
                )
            yield where, number, record


def _require_key(record: dict[str, Any], key: str, where: str, hint: str) -> None:
    if key not in record:
        present = ", ".join(map(repr, record)) or "none"
        raise ValueError(f"{where}: missing key {key!r} (keys present: {present}); {hint}")


def _prompt(prompt: Any, key: str, where: str) -> str:
    """``prompt`` if it is a string holding text."""
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: {key!r} must be a string; got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where}: {key!r} is empty ({prompt!r}); every prompt "
                         "needs text to complete")
    return prompt


def _decode_line(raw: bytes, where: str) -> str:
    """``raw`` as UTF-8 text; a ValueError naming ``where``, the byte and its column if not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        # the bytes before err.start decode, so the column counts characters like JSON's
        column = len(raw[:err.start].decode("utf-8")) + 1
        raise ValueError(
            f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); save "
            "the file as UTF-8"
        ) from err


class JsonlTask(Task):
    """Prompts and answers from a JSON Lines file, drawn uniformly with replacement.

    Args:
        path: the ``.jsonl`` file, read once at construction.
        prompt_key: key of the prompt in each line.
        answer_key: key of the reference answer in each line.
        reward_fn: import path of a custom reward function, ``"package.module:function"`` or
            ``"package.module.function"``, called as ``fn(completions, examples)``; exact match
            of the extracted answer when not given.
        validation_path: a second JSONL file (same keys) of held-out examples for evaluation;
            it may share no prompt with ``path``.
        validation_fraction: instead of ``validation_path``, hold out this share of ``path``'s
            prompts, in [0, 1), chosen by :func:`~trustregion.tasks.base.held_out_score` of each
            prompt (so the same lines whatever the seed, and repeated prompts stay together);
            the share of a small file is close to, not exactly, the fraction. 0 (the default)
            with no ``validation_path`` trains on every line and holds nothing out.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        reward_fn: str | None = None,
        validation_path: str | Path | None = None,
        validation_fraction: float = 0.0,
    ) -> None:
        self.prompt_key = non_empty_string("prompt_key", prompt_key)
        self.answer_key = non_empty_string("answer_key", answer_key)
        require(self.prompt_key != self.answer_key,
                f"prompt_key and answer_key must differ; both are {prompt_key!r}")
        self.path = Path(path).expanduser()
        self.reward_fn = reward_fn
        # Resolve the reward function before reading data, so a typo fails fast.
        self._reward_function: RewardFn = (
            load_reward_fn(reward_fn) if reward_fn is not None else exact_match
        )
        self.validation_fraction = validation_share(validation_fraction)
        require(validation_path is None or self.validation_fraction == 0,
                f"give validation_path or validation_fraction, not both; got validation_path="
                f"{str(validation_path)!r} and validation_fraction={validation_fraction}")
        self.validation_path = (Path(validation_path).expanduser()
                                if validation_path is not None else None)
        loaded = load_jsonl_examples(self.path, self.prompt_key, self.answer_key)
        self.name = self.path.stem
        self.data, self.held_out = self._split(loaded)

    def _split(self, loaded: list[Example]) -> tuple[list[Example], list[Example]]:
        """The training and held-out examples."""
        if self.validation_path is not None:
            held_out = load_jsonl_examples(self.validation_path, self.prompt_key,
                                           self.answer_key)
            self._held_out_prompts = {ex.prompt for ex in held_out}
            shared = [ex.prompt for ex in loaded if ex.prompt in self._held_out_prompts]
            if shared:
                raise ValueError(f"{len(set(shared))} prompt(s) of {self.validation_path} are "
                                 f"also in {self.path} (e.g. {shared[0]!r}); held-out prompts "
                                 "must not be trained on: remove them from one of the files")
            return loaded, held_out
        self._held_out_prompts = set()
        train = [ex for ex in loaded if self.split_of(ex) == "train"]
        held_out = [ex for ex in loaded if self.split_of(ex) == "validation"]
        if self.validation_fraction > 0:
            require(bool(train), f"validation_fraction={self.validation_fraction} held out "
                                 f"every one of the {len(loaded)} examples of {self.path}; "
                                 "lower it")
            require(bool(held_out), f"validation_fraction={self.validation_fraction} held out "
                                    f"none of the {len(loaded)} examples of {self.path}; "
                                    "raise it or give a validation_path")
        return train, held_out

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, rng: random.Random) -> Example:
        return self.data[rng.randrange(len(self.data))]

    def split_of(self, example: Example) -> Split:
        if self.validation_path is not None:
            return "validation" if example.prompt in self._held_out_prompts else "train"
        return super().split_of(example)

    def draw(self, rng: random.Random, split: Split = "train") -> Example:
        one_of("split", split, SPLITS)
        pool = self.data if split == "train" else self._require_held_out()
        return pool[rng.randrange(len(pool))]

    def validation_examples(self, n: int) -> list[Example]:
        """The first ``n`` held-out examples, in file order."""
        held_out = self._require_held_out()
        require(n <= len(held_out), f"the held-out split of {self.name} holds "
                                    f"{len(held_out)} examples, fewer than the {n} asked for")
        return held_out[:n]

    def _require_held_out(self) -> list[Example]:
        require(bool(self.held_out), f"the JSONL task {self.path} holds no examples out for "
                                     "validation; set validation_path (a separate file) or "
                                     "validation_fraction")
        return self.held_out

    def all_examples(self) -> list[Example]:
        return self.data

    @property
    def reward_function(self) -> RewardFn:
        return self._reward_function

    def hparams(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "prompt_key": self.prompt_key,
            "answer_key": self.answer_key,
            "reward_fn": self.reward_fn,
            "validation_path": (str(self.validation_path) if self.validation_path is not None
                                else None),
            "validation_fraction": self.validation_fraction,
        }
