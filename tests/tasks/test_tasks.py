import json
import math
import random
import textwrap
from typing import Any

import pytest
import torch

from trustregion.tasks import (
    TASKS,
    Arithmetic,
    DigitSort,
    Example,
    JsonlTask,
    Reverse,
    Task,
    available_tasks,
    exact_match,
    extract_answer,
    final_answer,
    get_task,
    load_reward_fn,
    prefix_credit,
    score,
)

# --------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("19", "19"),
        (" 19 ", "19"),
        ("19\n20", "19"),
        ("19<eos><pad><pad>", "19"),
        ("19 <eos>", "19"),
        ("\n19\nmore", "19"),
        ("1<eos>9\n", "1"),
        ("", ""),
        ("<eos>", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_prefix_credit():
    assert prefix_credit("123", "123") == 1.0
    assert prefix_credit("124", "123") == pytest.approx(2 / 3)
    assert prefix_credit("1234", "123") == pytest.approx(3 / 4)  # extra characters cost credit
    assert prefix_credit("12", "123") == pytest.approx(2 / 3)
    assert prefix_credit("", "123") == 0.0
    assert prefix_credit("923", "123") == 0.0  # only leading characters count
    assert prefix_credit("", "") == 1.0


# --------------------------------------------------------------------------- built-in tasks


def test_arithmetic_rewards_on_hand_written_completions():
    task = Arithmetic()
    examples = [Example("12+7=", "19")] * 5 + [Example("3-5=", "-2")]
    completions = ["19", "18", "19\n12+7=19", "", "19<eos>", "-2<eos>"]
    rewards = task.reward(completions, examples)
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_arithmetic_samples_are_correct():
    task = Arithmetic(min_value=0, max_value=30, operations=("+", "-", "*"))
    for ex in task.examples(300, seed=3):
        a, op, b = ex.meta["a"], ex.meta["op"], ex.meta["b"]
        assert ex.prompt == f"{a}{op}{b}="
        assert int(ex.answer) == eval(f"{a}{op}{b}")
        assert 0 <= a <= 30 and 0 <= b <= 30
    assert {ex.meta["op"] for ex in task.examples(300, seed=3)} == {"+", "-", "*"}


def test_digit_sort_and_reverse():
    sort = DigitSort()
    rev = Reverse()
    s = [Example("sort:312=", "123")]
    r = [Example("rev:abc=", "cba")]
    assert sort.reward(["123"], s).tolist() == [1.0]
    assert sort.reward(["132"], s).tolist() == [0.0]
    assert sort.reward(["123\nsort:1=1"], s).tolist() == [1.0]
    assert rev.reward(["cba<eos>"], r).tolist() == [1.0]
    assert rev.reward(["abc"], r).tolist() == [0.0]
    assert rev.reward([""], r).tolist() == [0.0]
    for ex in sort.examples(50, seed=0):
        digits = ex.prompt.removeprefix("sort:").removesuffix("=")
        assert ex.answer == "".join(sorted(digits)) and 3 <= len(digits) <= 5
    for ex in rev.examples(50, seed=0):
        text = ex.prompt.removeprefix("rev:").removesuffix("=")
        assert ex.answer == text[::-1] and set(text) <= set("abcde")


def test_partial_credit_option():
    examples = [Example("sort:312=", "123")] * 3
    completions = ["123", "12", "9"]
    assert DigitSort().reward(completions, examples).tolist() == [1.0, 0.0, 0.0]
    got = DigitSort(partial_credit=True).reward(completions, examples).tolist()
    assert got == pytest.approx([1.0, 2 / 3, 0.0])
    assert Arithmetic(partial_credit=True).reward(["18"], [Example("12+7=", "19")]).item() == 0.5
    assert Reverse(partial_credit=True).reward(["cbaa"], [Example("rev:abc=", "cba")]).item() == (
        0.75
    )


# ------------------------------------------------------------------ instruction-style prompts


@pytest.mark.parametrize(
    ("completion", "pattern", "expected"),
    [
        ("12 + 7 = 19", r"-?\d+", "19"),
        ("The answer is -2.", r"-?\d+", "-2"),
        ("19\n12 + 7 = 20", r"-?\d+", "19"),  # only the answer line counts
        ("no number here", r"-?\d+", ""),
        ("Sorted: 0345<eos>99", r"\d+", "0345"),
    ],
)
def test_final_answer_takes_the_last_match_on_the_answer_line(completion, pattern, expected):
    assert final_answer(completion, pattern) == expected


def test_instruction_prompts_ask_in_words_for_the_same_answers():
    compact = Arithmetic(operations=("+", "-", "*")).examples(30, seed=5)
    worded = Arithmetic(operations=("+", "-", "*"), prompt_style="instruction").examples(30, seed=5)
    for short, long in zip(compact, worded, strict=True):
        a, op, b = short.meta["a"], short.meta["op"], short.meta["b"]
        assert long.prompt == f"What is {a} {op} {b}? Reply with the number only."
        assert (long.answer, long.meta) == (short.answer, short.meta)
    (ex,) = DigitSort(prompt_style="instruction").examples(1, seed=0)
    digits = ex.prompt.removeprefix("Sort the digits ").removesuffix(
        " in ascending order. Reply with the sorted digits only.")
    assert digits.isdigit() and ex.answer == "".join(sorted(digits))
    (ex,) = Reverse(prompt_style="instruction").examples(1, seed=0)
    text = ex.prompt.removeprefix("Reverse the string ").removesuffix(
        ". Reply with the reversed string only.")
    assert set(text) <= set("abcde") and ex.answer == text[::-1]


def test_instruction_style_scores_the_final_answer():
    task = Arithmetic(prompt_style="instruction")
    examples = [Example("What is 12 + 7? Reply with the number only.", "19")] * 5
    completions = ["12 + 7 = 19", "19.", "19 is wrong, it is 20", "Sure!\n19", "191"]
    assert task.reward(completions, examples).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    # partial credit on the final answer: "18" vs "19" → 1/2; "191" vs "19" → 2/3
    partial = Arithmetic(prompt_style="instruction", partial_credit=True)
    assert partial.reward(["12 + 7 = 18", "191"], examples[:2]).tolist() == pytest.approx(
        [0.5, 2 / 3])
    sort = DigitSort(prompt_style="instruction")
    assert sort.reward(["The sorted digits of 312 are 123."],
                       [Example("...", "123")]).tolist() == [1.0]
    # the last run of alphabet characters: "cba" here, but "e" (from "the") in the second
    rev = Reverse(prompt_style="instruction")
    assert rev.reward(["The reversed string is cba.", "cba is the answer"],
                      [Example("...", "cba")] * 2).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("cls", [Arithmetic, DigitSort, Reverse])
def test_unknown_prompt_style_is_refused(cls):
    with pytest.raises(ValueError, match="prompt_style must be one of 'compact', 'instruction'; "
                                         "got 'chat'"):
        cls(prompt_style="chat")


@pytest.mark.parametrize("name", ["arithmetic", "digit_sort", "reverse"])
def test_examples_are_deterministic(name):
    task = get_task(name)
    first = task.examples(20, seed=7)
    assert first == task.examples(20, seed=7)
    assert first != task.examples(20, seed=8)
    assert len(first) == 20
    rng_a, rng_b = random.Random(1), random.Random(1)
    assert [task.sample(rng_a) for _ in range(5)] == [task.sample(rng_b) for _ in range(5)]
    # answers earn full reward
    assert task.reward([ex.answer for ex in first], first).tolist() == [1.0] * 20


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (Arithmetic, {"min_value": -1}, "min_value must be an integer ≥ 0; got -1"),
        (
            Arithmetic,
            {"min_value": 5, "max_value": 4},
            "max_value must be ≥ min_value; got min_value=5, max_value=4",
        ),
        (Arithmetic, {"max_value": 2.5}, "max_value must be an integer ≥ 0; got 2.5"),
        (Arithmetic, {"max_value": True}, "max_value must be an integer ≥ 0; got True"),
        (
            Arithmetic,
            {"operations": ("+", "/")},
            "unknown operation(s) '/'; allowed: '+', '-', '*'",
        ),
        (Arithmetic, {"operations": ()}, "operations must name at least one of"),
        (Arithmetic, {"operations": ("+", "+")}, "operations must not repeat"),
        (Arithmetic, {"partial_credit": "yes"}, "partial_credit must be True or False"),
        (DigitSort, {"min_len": 0}, "min_len must be an integer ≥ 1; got 0"),
        (
            DigitSort,
            {"min_len": 4, "max_len": 3},
            "max_len must be ≥ min_len; got min_len=4, max_len=3",
        ),
        (Reverse, {"alphabet": ""}, "alphabet must be a non-empty string"),
        (Reverse, {"alphabet": "ab c"}, "alphabet must not contain whitespace or '='"),
        (Reverse, {"alphabet": "a=b"}, "alphabet must not contain whitespace or '='"),
        (Reverse, {"alphabet": "aab"}, "alphabet characters must be distinct"),
    ],
)
def test_hyperparameter_validation(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert message in str(info.value)


def test_examples_rejects_negative_count():
    with pytest.raises(ValueError, match="n must be an integer ≥ 0; got -1"):
        Arithmetic().examples(-1)


def test_registry():
    assert set(available_tasks()) >= {"arithmetic", "digit_sort", "reverse"}
    task = get_task("digit_sort", max_len=7)
    assert isinstance(task, DigitSort) and task.max_len == 7
    assert TASKS["reverse"] is Reverse
    with pytest.raises(ValueError, match=r"unknown task 'arithmetik'\. Did you mean 'arithmetic'"):
        get_task("arithmetik")
    with pytest.raises(ValueError, match="Known tasks: arithmetic, digit_sort"):
        get_task("nope")


def test_repr_lists_hyperparameters():
    assert repr(Reverse(max_len=4)) == (
        "Reverse(min_len=3, max_len=4, alphabet='abcde', partial_credit=False, "
        "prompt_style='compact', validation_fraction=0.125)"
    )


def test_hparams_are_plain_config_values(tmp_path):
    assert Arithmetic(operations=("*",)).hparams() == {
        "min_value": 0,
        "max_value": 20,
        "operations": ["*"],
        "partial_credit": False,
        "prompt_style": "compact",
        "validation_fraction": 0.125,
    }
    path = write_jsonl(tmp_path / "h.jsonl", [json.dumps({"prompt": "p", "answer": "a"})])
    assert JsonlTask(path).hparams() == {
        "path": str(path),
        "prompt_key": "prompt",
        "answer_key": "answer",
        "reward_fn": None,
        "validation_path": None,
        "validation_fraction": 0.0,
    }
    task = Arithmetic(**Arithmetic(max_value=5).hparams())
    assert task.max_value == 5 and task.operations == ("+", "-")


def test_example_is_hashable_and_frozen():
    ex = Example("1+1=", "2", {"a": 1})
    assert hash(ex) == hash(Example("1+1=", "2"))
    with pytest.raises(AttributeError):
        ex.answer = "3"  # type: ignore[misc]


# --------------------------------------------------------------------------- JSONL tasks


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_task_loads_and_samples(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"prompt": "2+2=", "answer": "4", "level": 1}),
            "",
            json.dumps({"prompt": "3*3=", "answer": 9}),
        ],
    )
    task = JsonlTask(path)
    assert len(task) == 2 and task.name == "qa"
    assert task.data[0] == Example("2+2=", "4", {"level": 1})
    assert task.data[1].answer == "9"
    drawn = task.examples(50, seed=0)
    assert drawn == task.examples(50, seed=0)
    assert {ex.prompt for ex in drawn} == {"2+2=", "3*3="}
    assert task.reward(["4\nok", "8"], task.data).tolist() == [1.0, 0.0]
    built = get_task("jsonl", path=str(path))
    assert isinstance(built, JsonlTask) and built.data == task.data


def test_jsonl_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"q": "hi", "a": "yo"})])
    task = JsonlTask(path, prompt_key="q", answer_key="a")
    assert task.data == [Example("hi", "yo")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_key": ""}, "prompt_key must be a non-empty string; got ''"),
        ({"answer_key": 3}, "answer_key must be a non-empty string; got 3"),
        ({"prompt_key": "q", "answer_key": "q"}, "prompt_key and answer_key must differ; both "
                                                 "are 'q'"),
    ],
)
def test_jsonl_key_names_are_checked(tmp_path, kwargs, message):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"q": "hi", "a": "yo"})])
    with pytest.raises(ValueError) as info:
        JsonlTask(path, **kwargs)
    assert str(info.value) == message


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"JSONL task file not found: .*nothing\.jsonl"):
        JsonlTask(tmp_path / "nothing.jsonl")


def test_jsonl_bad_line_reports_line_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": "b"}', "{oops"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        JsonlTask(path)


def test_jsonl_missing_key_is_named(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [json.dumps({"prompt": "a", "solution": "b"})])
    with pytest.raises(ValueError, match=r"k\.jsonl:1: missing key 'answer' \(keys present: "
                       r"'prompt', 'solution'\)"):
        JsonlTask(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "each line must be a JSON object; got list"),
        ('{"prompt": 3, "answer": "b"}', "'prompt' must be a string; got int"),
        ('{"prompt": "a", "answer": ["b"]}', "'answer' must be a string or a number; got list"),
    ],
)
def test_jsonl_bad_values(tmp_path, line, message):
    path = write_jsonl(tmp_path / "v.jsonl", [line])
    with pytest.raises(ValueError, match=":1: ") as info:
        JsonlTask(path)
    assert message in str(info.value)


def test_jsonl_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="holds no examples"):
        JsonlTask(path)


# --------------------------------------------------------------------------- reward functions


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module ``my_rewards`` importable from a temporary directory."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_reward(completions, examples):
                return [float(len(c)) for c in completions]

            def wrong_length(completions, examples):
                return [0.0] * (len(completions) + 1)

            def with_nan(completions, examples):
                return [float("nan")] * len(completions)

            def raises(completions, examples):
                raise KeyError("boom")

            class Scorer:
                @staticmethod
                def score(completions, examples):
                    return [1.0] * len(completions)

            NOT_CALLABLE = 3
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_load_reward_fn_both_forms(reward_module):
    by_colon = load_reward_fn(f"{reward_module}:length_reward")
    by_dot = load_reward_fn(f"{reward_module}.length_reward")
    assert by_colon is by_dot
    assert load_reward_fn(f"{reward_module}:Scorer.score")(["a"], [Example("p", "a")]) == [1.0]


def test_load_reward_fn_errors(reward_module):
    with pytest.raises(ImportError, match="module 'no_such_module_xyz' not found"):
        load_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(AttributeError, match="module 'my_rewards' has no attribute 'missing'"):
        load_reward_fn(f"{reward_module}:missing")
    with pytest.raises(TypeError, match="is a int, not a callable"):
        load_reward_fn(f"{reward_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="malformed reward function path 'nodots'"):
        load_reward_fn("nodots")
    with pytest.raises(ValueError, match="malformed"):
        load_reward_fn("path/to/file.py:fn")


def test_jsonl_task_with_custom_reward(tmp_path, reward_module):
    path = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"prompt": "p", "answer": "a"})])
    task = JsonlTask(path, reward_fn=f"{reward_module}:length_reward")
    assert task.reward(["abc", ""], task.data * 2).tolist() == [3.0, 0.0]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        JsonlTask(path, reward_fn=f"{reward_module}:nope")


def test_score_accepts_sequences_and_tensors():
    examples = [Example("p", "a")] * 3
    out = score(lambda c, e: torch.tensor([1, 0, 1]), ["a", "b", "a"], examples)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 1.0]
    assert score(exact_match, ["a", "b", "a"], examples).tolist() == [1.0, 0.0, 1.0]
    assert score(lambda c, e: (True, False, True), ["", "", ""], examples).tolist() == [1, 0, 1]


def test_score_wrong_length_names_function_and_shapes(reward_module):
    fn = load_reward_fn(f"{reward_module}:wrong_length")
    examples = [Example("p", "a")] * 2
    with pytest.raises(ValueError) as info:
        score(fn, ["a", "b"], examples)
    message = str(info.value)
    assert "my_rewards.wrong_length" in message
    assert "returned shape (3,)" in message and "expected shape (2,)" in message


def returning(value: Any) -> Any:
    """A reward function that returns ``value`` whatever it is given."""
    return lambda completions, examples: value


def test_score_rejects_2d_and_scalar():
    examples = [Example("p", "a")] * 2
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\); expected shape \(2,\)"):
        score(returning(torch.ones(2, 1)), ["a", "b"], examples)
    with pytest.raises(ValueError, match=r"returned shape \(\); expected shape \(2,\)"):
        score(returning(1.0), ["a", "b"], examples)
    with pytest.raises(TypeError, match="returned str"):
        score(returning("11"), ["a", "b"], examples)
    with pytest.raises(TypeError, match="returned NoneType"):
        score(returning(None), ["a", "b"], examples)
    with pytest.raises(TypeError, match="not a sequence of numbers"):
        score(returning(["x", "y"]), ["a", "b"], examples)


def test_score_nan_names_function_and_count(reward_module):
    fn = load_reward_fn(f"{reward_module}:with_nan")
    with pytest.raises(ValueError, match=r"my_rewards\.with_nan returned 3 non-finite value"):
        score(fn, ["a", "b", "c"], [Example("p", "a")] * 3)

    def one_inf(completions, examples):
        return [0.0, math.inf]

    with pytest.raises(ValueError, match=r"one_inf returned 1 non-finite value"):
        score(one_inf, ["a", "b"], [Example("p", "a")] * 2)


def test_score_wraps_exceptions(reward_module):
    fn = load_reward_fn(f"{reward_module}:raises")
    with pytest.raises(RuntimeError, match=r"reward function my_rewards\.raises raised KeyError"):
        score(fn, ["a"], [Example("p", "a")])
    try:
        score(fn, ["a"], [Example("p", "a")])
    except RuntimeError as err:
        assert isinstance(err.__cause__, KeyError)


def test_score_checks_matching_lengths():
    with pytest.raises(ValueError, match="got 2 completions but 1 examples"):
        score(exact_match, ["a", "b"], [Example("p", "a")])


def test_builtin_reward_goes_through_validation():
    class Broken(Arithmetic):
        @property
        def reward_function(self):
            def half(completions, examples):
                return [0.5]

            return half

    with pytest.raises(ValueError, match=r"half returned shape \(1,\); expected shape \(2,\)"):
        Broken().reward(["1", "2"], [Example("1+0=", "1")] * 2)


def test_custom_task_subclass():
    class Constant(Task):
        name = "constant"

        def __init__(self, value: str = "x") -> None:
            self.value = value

        def sample(self, rng):
            return Example(prompt="say:", answer=self.value)

    task = Constant("y")
    assert task.examples(2) == [Example("say:", "y")] * 2
    assert task.reward(["y", "x"], task.examples(2)).tolist() == [1.0, 0.0]
    assert repr(task) == "Constant(value='y')"


# ------------------------------------------------------------------------- held-out splits
from trustregion.data import PromptStream  # noqa: E402
from trustregion.tasks.base import MAX_DRAWS, held_out_score  # noqa: E402


def _every_arithmetic_problem(task: Arithmetic) -> list[Example]:
    values = range(task.min_value, task.max_value + 1)
    return [Example(f"{a}{op}{b}=", "", {"a": a, "b": b, "op": op})
            for a in values for b in values for op in task.operations]


def test_training_batches_never_hold_a_validation_prompt():
    task = Arithmetic()  # 21 × 21 × 2 = 882 problems, 1/8 held out
    held_out = task.validation_examples(64)
    assert held_out == task.validation_examples(64)  # the same list at every evaluation
    prompts = {ex.prompt for ex in held_out}
    assert len(prompts) == 64  # distinct prompts
    assert all(held_out_score(p) < 0.125 for p in prompts)
    stream = PromptStream(task, batch_size=16, seed=0)
    trained = {ex.prompt for i in range(300) for ex in stream.batch(i).examples}
    assert len(trained) > 600  # 4800 draws reach nearly every one of the ~770 training problems
    assert not trained & prompts
    assert all(held_out_score(p) >= 0.125 for p in trained)


def test_the_split_follows_the_prompt_not_the_seed():
    task = Arithmetic()
    problems = _every_arithmetic_problem(task)
    held_out = {ex.prompt for ex in problems if task.split_of(ex) == "validation"}
    # every held-out problem a validation draw can reach, whatever the seed
    drawn = {ex.prompt for seed in range(3) for ex in task.examples(400, seed=seed,
                                                                   split="validation")}
    assert drawn == held_out
    assert 0.08 < len(held_out) / len(problems) < 0.17  # about the configured 1/8


def test_both_prompt_styles_hold_out_the_same_problems():
    compact = Arithmetic(operations=("+", "-", "*")).validation_examples(20)
    worded = Arithmetic(operations=("+", "-", "*"), prompt_style="instruction"
                        ).validation_examples(20)
    assert [ex.meta for ex in compact] == [ex.meta for ex in worded]
    for cls in (DigitSort, Reverse):
        short = cls().validation_examples(10)
        long = cls(prompt_style="instruction").validation_examples(10)
        assert [ex.answer for ex in short] == [ex.answer for ex in long]


def test_validation_fraction_zero_holds_nothing_out():
    task = Arithmetic(validation_fraction=0)
    assert task.examples(30, seed=4) == [task.sample(r) for r in [random.Random(4)]
                                         for _ in range(30)]
    with pytest.raises(ValueError, match=r"Arithmetic holds no prompts out for validation "
                                         r"\(validation_fraction=0\); set validation_fraction"):
        task.validation_examples(1)


@pytest.mark.parametrize("bad", [1.0, -0.1, "x", True, math.nan])
def test_validation_fraction_must_lie_in_zero_one(bad):
    with pytest.raises(ValueError, match=r"validation_fraction must be a finite number in "
                                         r"\[0.0, 1.0\) \(0 holds no prompts out\); got"):
        Reverse(validation_fraction=bad)


def test_a_split_with_no_prompt_fails_with_a_clear_message():
    task = Reverse(min_len=1, max_len=1, alphabet="a")  # a single problem: rev:a=
    empty = "train" if task.split_of(Example("rev:a=", "a")) == "validation" else "validation"
    with pytest.raises(ValueError, match=rf"Reverse drew no {empty} example in {MAX_DRAWS} "
                                         r"draws: its prompts are too few"):
        task.examples(1, split=empty)


def test_asking_for_more_held_out_prompts_than_exist_fails():
    task = Arithmetic(max_value=3, operations=("+",), validation_fraction=0.5)
    held_out = [ex for ex in _every_arithmetic_problem(task) if task.split_of(ex) == "validation"]
    assert sorted(ex.prompt for ex in task.validation_examples(len(held_out))) == sorted(
        ex.prompt for ex in held_out)
    with pytest.raises(ValueError, match=rf"validation split holds only {len(held_out)} "
                                         rf"distinct prompts, fewer than the 20 asked for"):
        task.validation_examples(20)
    with pytest.raises(ValueError, match=r"split must be one of"):
        task.examples(1, split="test")  # type: ignore[arg-type]


def _lines(prompts):
    return [json.dumps({"prompt": p, "answer": str(i)}) for i, p in enumerate(prompts)]


def test_jsonl_validation_fraction_splits_the_file_by_prompt(tmp_path):
    prompts = [f"q{i}?" for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", _lines(prompts))
    assert len(JsonlTask(path)) == 40  # no split by default: every line trains
    task = JsonlTask(path, validation_fraction=0.25)
    expected = [p for p in prompts if held_out_score(p) < 0.25]  # in file order
    assert [ex.prompt for ex in task.held_out] == expected and 0 < len(expected) < 40
    assert [ex.prompt for ex in task.data] == [p for p in prompts if p not in expected]
    assert task.validation_examples(2) == task.held_out[:2]
    assert {ex.prompt for ex in task.examples(200, seed=1)} == {ex.prompt for ex in task.data}
    with pytest.raises(ValueError, match=rf"the held-out split of d holds {len(expected)} "
                                         r"examples, fewer than the 99 asked for"):
        task.validation_examples(99)
    assert task.hparams()["validation_fraction"] == 0.25


def test_jsonl_validation_path_holds_out_a_second_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _lines(["a?", "b?", "c?"]))
    held = write_jsonl(tmp_path / "val.jsonl", _lines(["x?", "y?"]))
    task = JsonlTask(train, validation_path=held)
    assert [ex.prompt for ex in task.data] == ["a?", "b?", "c?"]
    assert [ex.prompt for ex in task.validation_examples(2)] == ["x?", "y?"]
    assert task.split_of(Example("y?", "1")) == "validation"
    assert task.split_of(Example("a?", "0")) == "train"
    assert task.hparams()["validation_path"] == str(held)
    leaky = write_jsonl(tmp_path / "leaky.jsonl", _lines(["x?", "b?"]))
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of .*leaky.jsonl are also in "
                                         r".*train.jsonl \(e.g. 'b\?'\)"):
        JsonlTask(train, validation_path=leaky)
    with pytest.raises(ValueError, match=r"give validation_path or validation_fraction, not "
                                         r"both"):
        JsonlTask(train, validation_path=held, validation_fraction=0.5)
    with pytest.raises(ValueError, match=r"holds no examples out for validation; set "
                                         r"validation_path \(a separate file\) or "
                                         r"validation_fraction"):
        JsonlTask(train).validation_examples(1)
