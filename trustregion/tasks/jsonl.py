"""A task read from a JSON Lines file of prompts and answers.

Each non-blank line is a JSON object; two of its keys hold the prompt and the answer (names set
by ``prompt_key`` / ``answer_key``), every other key is kept in :attr:`Example.meta` for custom
reward functions::

    {"prompt": "What is 2+3? ", "answer": "5", "difficulty": 1}
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from trustregion.tasks.base import Task
from trustregion.tasks.example import Example
from trustregion.tasks.rewards import RewardFn, exact_match, load_reward_fn
from trustregion.validation import non_empty_string, require

__all__ = ["JsonlTask", "load_jsonl_examples"]


def load_jsonl_examples(
    path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer"
) -> list[Example]:
    """Read every example of a JSONL file.

    Numeric answers are turned into strings (``19`` → ``"19"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a line is not valid JSON or not an object, a key is missing, a value has the
            wrong type, or the file holds no examples; the message gives the line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"JSONL task file {what}: {path}")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
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
            for key in (prompt_key, answer_key):
                if key not in record:
                    present = ", ".join(map(repr, record)) or "none"
                    raise ValueError(
                        f"{where}: missing key {key!r} (keys present: {present}); set "
                        f"prompt_key / answer_key to the fields holding the prompt and answer"
                    )
            prompt = record.pop(prompt_key)
            answer = record.pop(answer_key)
            if not isinstance(prompt, str):
                raise ValueError(
                    f"{where}: {prompt_key!r} must be a string; got {type(prompt).__name__}"
                )
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
        raise ValueError(f"JSONL task file holds no examples: {path}")
    return examples


class JsonlTask(Task):
    """Prompts and answers from a JSON Lines file, drawn uniformly with replacement.

    Args:
        path: the ``.jsonl`` file, read once at construction.
        prompt_key: key of the prompt in each line.
        answer_key: key of the reference answer in each line.
        reward_fn: import path of a custom reward function, ``"package.module:function"`` or
            ``"package.module.function"``, called as ``fn(completions, examples)``; exact match
            of the extracted answer when not given.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        reward_fn: str | None = None,
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
        self.data = load_jsonl_examples(self.path, self.prompt_key, self.answer_key)
        self.name = self.path.stem

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, rng: random.Random) -> Example:
        return self.data[rng.randrange(len(self.data))]

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
        }
