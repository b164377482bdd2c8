"""Tasks with verifiable rewards: built-in synthetic tasks, JSONL data, custom reward functions.

>>> task = get_task("arithmetic")
>>> batch = task.examples(2, seed=0)
>>> task.reward([batch[0].answer, "nope"], batch)
tensor([1., 0.])
"""

from trustregion.tasks.base import Example, Task
from trustregion.tasks.builtin import (
    PROMPT_STYLES,
    TASKS,
    Arithmetic,
    DigitSort,
    Reverse,
    available_tasks,
    get_task,
)
from trustregion.tasks.jsonl import JsonlTask, load_jsonl_examples
from trustregion.tasks.rewards import (
    END_MARKERS,
    RewardFn,
    exact_match,
    extract_answer,
    final_answer,
    load_reward_fn,
    prefix_credit,
    prefix_match,
    score,
)

__all__ = [
    "END_MARKERS",
    "PROMPT_STYLES",
    "TASKS",
    "Arithmetic",
    "DigitSort",
    "Example",
    "JsonlTask",
    "Reverse",
    "RewardFn",
    "Task",
    "available_tasks",
    "exact_match",
    "extract_answer",
    "final_answer",
    "get_task",
    "load_jsonl_examples",
    "load_reward_fn",
    "prefix_credit",
    "prefix_match",
    "score",
]
