"""The reward-function interface: every spec gives a callable returning (B,) float32 with a name."""

import sys
import types

import pytest
import torch

from lab.rewards import (
    FunctionReward,
    GoldReward,
    RewardFn,
    RewardSpecError,
    SumReward,
    completion_answer,
    make_reward,
    reference_answer,
    to_number,
)
from lab.tasks import get_task


def test_gold_reward_on_arith_is_exact_match():
    """47+38 = 85: "85" scores 1, the dropped-carry answer "75" scores 0."""
    reward = make_reward("gold", get_task("arith"))
    out = reward(["47+38=", "47+38=", "10+10="], ["85", "75", "20"])
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == [1.0, 0.0, 1.0]
    assert reward.name == "gold:arith"
    assert isinstance(reward, RewardFn) and isinstance(reward, GoldReward)


def test_gold_reward_passes_truncated_to_the_task():
    seen = {}

    class Task:
        name = "t"

        def gold_rewards(self, prompts, completions, truncated):
            seen["truncated"] = truncated
            return [0.5] * len(prompts)

    out = GoldReward(Task())(["a", "b"], ["x", "y"], torch.tensor([True, False]))
    assert seen["truncated"] == [True, False]
    assert out.tolist() == [0.5, 0.5]


def test_callable_and_python_spec():
    """A plain function (prompts, completions) -> list works given directly or as python:module:function;
    a function that takes `truncated=` receives it."""
    module = types.ModuleType("my_rewards_for_test")
    module.length = lambda prompts, completions: [len(c) for c in completions]
    module.ends = lambda prompts, completions, truncated=None: [0.0 if t else 1.0 for t in truncated]
    sys.modules[module.__name__] = module
    try:
        by_spec = make_reward("python:my_rewards_for_test:length")
        assert by_spec(["p", "p"], ["abc", "a"]).tolist() == [3.0, 1.0]
        assert by_spec.name == "python:my_rewards_for_test:length"
        ends = make_reward(module.ends)
        assert ends(["p", "p"], ["a", "b"], [True, False]).tolist() == [0.0, 1.0]
        assert isinstance(make_reward(module.length), FunctionReward)
    finally:
        del sys.modules[module.__name__]


def test_reward_model_path_delegates_to_lab_rm(tmp_path, monkeypatch):
    """An existing path goes to lab.rm.load_reward_model (imported only then)."""
    calls = []

    def fake_loader(path):
        calls.append(path)

        def scorer(prompts, completions, truncated=None):
            return torch.ones(len(prompts))

        return scorer

    fake_rm = types.ModuleType("lab.rm")
    fake_rm.load_reward_model = fake_loader
    monkeypatch.setitem(sys.modules, "lab.rm", fake_rm)
    reward = make_reward(str(tmp_path))
    assert calls == [str(tmp_path)]
    assert reward(["a"], ["b"]).tolist() == [1.0]
    assert reward.name.startswith("rm:")


@pytest.mark.parametrize(
    "spec,words",
    [
        ("nonsense", "unknown reward"),
        ("python:only_module", "python:module:function"),
        ("python:no_such_module_xyz:f", "cannot import"),
        ("python:os:no_such_function", "has no function"),
        (42, "unknown reward"),
    ],
)
def test_bad_specs_give_one_line_errors(spec, words):
    with pytest.raises(RewardSpecError) as err:
        make_reward(spec, get_task("arith"))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_gold_without_task_and_wrong_length():
    with pytest.raises(RewardSpecError, match="needs a built-in task"):
        make_reward("gold", None)
    bad = make_reward(lambda prompts, completions: [1.0])
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        bad(["a", "b"], ["x", "y"])


# ---- TRL's calling convention: dataset columns as keyword arguments ---------------------------------------------


def test_trl_style_function_gets_its_columns_by_keyword():
    """TRL calls reward_func(prompts=..., completions=..., **columns); `def f(completions, answer, **kw)` works
    unchanged, and **kw also holds the prompts, `truncated` and every other column."""
    seen = {}

    def reward(completions, answer, **kwargs):
        seen.update(kwargs)
        return [float(c == a) for c, a in zip(completions, answer)]

    fn = make_reward(reward)
    out = fn(["1+1=", "2+2="], ["2", "5"], [False, True], answer=["2", "4"], id=[7, 8])
    assert out.tolist() == [1.0, 0.0]
    assert seen == {"prompts": ["1+1=", "2+2="], "truncated": [False, True], "id": [7, 8]}


def test_function_without_kwargs_gets_only_what_it_names():
    """No **kwargs: only the named columns are passed; `prompts` is left out when the function does not name it."""

    def by_answer(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    assert make_reward(by_answer)(["p", "q"], ["4", "x"], answer=["4", "y"], id=[1, 2]).tolist() == [1.0, 0.0]
    # the lab's older positional style, whatever its arguments are called, with a column after them
    positional = make_reward(lambda p, c, answer: [float(x == a) for x, a in zip(c, answer)])
    assert positional(["p"], ["4"], answer=["4"]).tolist() == [1.0]
    assert make_reward(lambda p, c: [len(x) for x in c])(["p"], ["abc"], answer=["4"]).tolist() == [3.0]


def test_keyword_only_functions_are_called_trl_style():
    """TRL's length rewards take `completion_ids` and no completions; `f(**kwargs)` gets everything by keyword."""
    by_ids = make_reward(lambda completion_ids, **kw: [len(ids) for ids in completion_ids])
    assert by_ids(["p", "q"], ["a b", "c"], completion_ids=[[5, 6], [7]]).tolist() == [2.0, 1.0]
    seen = {}
    everything = make_reward(lambda **kw: seen.update(kw) or [0.0])
    everything(["p"], ["c"], None, answer=["1"])
    assert seen == {"prompts": ["p"], "completions": ["c"], "truncated": [False], "answer": ["1"]}
    with pytest.raises(RewardSpecError, match="needs column 'completion_ids', but the data has no extra columns"):
        by_ids(["p"], ["c"])


def test_missing_required_column_is_one_line_naming_it_and_what_there_is():
    def by_answer(completions, answer, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(RewardSpecError) as err:
        make_reward(by_answer)(["p"], ["c"], None, id=[1], source=["gsm8k"])
    assert str(err.value) == "reward 'by_answer' needs column 'answer', but the data has columns id, source"
    with pytest.raises(RewardSpecError, match=r"but the data has no extra columns \(only prompts and completions\)$"):
        make_reward(by_answer)(["p"], ["c"])


def test_conversational_prompts_get_message_list_completions_like_trl():
    """TRL decodes a completion of a conversational prompt as [{"role": "assistant", "content": text}]; its own
    reward functions read completion[0]["content"]."""
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen["completions"] = completions
        return [len(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    chat = [{"role": "user", "content": "Say hi"}]
    assert make_reward(reward)([chat, chat], ["hi", "hello"]).tolist() == [2.0, 5.0]
    assert seen["completions"] == [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "assistant", "content": "hello"}],
    ]
    assert make_reward(reward)(["Say hi"], ["hi"]).tolist() == [2.0]  # string prompts: string completions
    assert seen["completions"] == ["hi"]


def test_trl_builtin_reward_runs_unchanged():
    """trl.rewards.think_format_reward(completions, **kwargs), as TRL ships it."""
    rewards = pytest.importorskip("trl.rewards")
    chat = [{"role": "user", "content": "q"}]
    fn = make_reward(rewards.think_format_reward)
    assert fn([chat, chat], ["<think>\nhmm\n</think>\n42", "42"], answer=["42", "42"]).tolist() == [1.0, 0.0]


def test_columns_must_be_aligned_and_values_numbers():
    fn = make_reward(lambda completions, **kw: [1.0] * len(completions))
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        fn(["a", "b"], ["x", "y"], answer=["1"])
    with pytest.raises(ValueError, match="returned None for completion 1: TRL skips such rows"):
        make_reward(lambda completions, **kw: [1.0, None])(["a", "b"], ["x", "y"])


def test_gold_and_reward_model_ignore_columns(tmp_path, monkeypatch):
    gold = make_reward("gold", get_task("arith"))
    assert gold(["47+38="], ["85"], None, answer=["75"]).tolist() == [1.0]  # the task knows its answer
    fake_rm = types.ModuleType("lab.rm")
    fake_rm.load_reward_model = lambda path: lambda prompts, completions, truncated=None: torch.ones(len(prompts))
    monkeypatch.setitem(sys.modules, "lab.rm", fake_rm)
    assert make_reward(str(tmp_path))(["a"], ["b"], None, answer=["1"]).tolist() == [1.0]


# ---- the verifiable math rewards ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72", "72"),  # GSM8K
        ("The total is 1,000 dollars.\n#### 1,000", "1000"),  # commas removed
        ("It drops by 3.\n#### -3", "-3"),
        (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # MATH: the box, braces balanced
        (r"First \boxed{1}, then \boxed{2}", "2"),
        (42, "42"),
        (" 7.5 ", "7.5"),
    ],
)
def test_reference_answer(reference, expected):
    assert reference_answer(reference) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3 + 4 = 7. The answer is 7.", "7"),
        (r"so the answer is \boxed{12}, since 12 > 5", "12"),  # the box wins over a later number
        (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        ("The temperature fell to -5 degrees", "-5"),
        ("3-5 is negative", "5"),  # a minus after a digit is subtraction, not a sign
        ("Each costs $1,234.50 in total", "$1,234.50"),
        ("pi is about 3.14", "3.14"),
        ("x2 and y3 are unknown", None),  # digits inside words are not numbers
        ("I do not know", None),
        (r"cut off at \boxed{12", "12"),  # an unclosed box: the last number
    ],
)
def test_completion_answer(completion, expected):
    assert completion_answer(completion) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", 42.0),
        ("42.0", 42.0),
        ("1,000", 1000.0),
        ("$5", 5.0),
        ("-3", -3.0),
        ("50%", 50.0),
        ("7.", 7.0),
        (r"\frac{1}{2}", 0.5),
        (r"\dfrac{3}{4}", 0.75),
        ("1/4", 0.25),
        (r"18 \text{ dollars}", 18.0),
        ("x + 1", None),
        ("", None),
    ],
)
def test_to_number(text, expected):
    assert to_number(text) == expected


def test_math_reward_hand_computed():
    """References: 72, 1000, 0.5, 5, 3. Completions' answers: 72.0 (=72), 1,000 (=1000), 1/2 boxed (=0.5),
    $5 (=5), and no number at all -> 0. A wrong answer (4 for 3) -> 0.
    Rewards: 1, 1, 1, 1, 0 and 0."""
    fn = make_reward("math")
    completions = ["So 72.0 clips.", "The total is 1,000", r"\boxed{\frac{1}{2}}", "It costs $5.", "no idea", "4"]
    answer = ["#### 72", "#### 1,000", r"\boxed{0.5}", 5, "#### 3", "#### 3"]
    assert fn(["q"] * 6, completions, None, answer=answer).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert fn.name == "math"
    # conversational completions (chat prompts) are read from the assistant message
    chat = [{"role": "user", "content": "6*7?"}]
    assert fn([chat], ["It is 42."], answer=["#### 42"]).tolist() == [1.0]
    # MATH rows carry a "solution" column instead
    assert fn(["q"], [r"\boxed{2}"], solution=[r"so x = \boxed{2}"]).tolist() == [1.0]


def test_math_reward_without_answer_column():
    with pytest.raises(RewardSpecError) as err:
        make_reward("math")(["q"], ["42"], None, id=[3])
    message = str(err.value)
    assert message.startswith("reward 'math' needs an 'answer' column") and message.endswith("the data has columns id")
    assert "\n" not in message


def test_format_reward_and_sum():
    """format: boxed / '####' / 'the answer is' -> 1, another number -> 0.5, no number or an empty box -> 0.
    math+format on ('#### 7', answer 7) = 1 + 1 = 2; on ('maybe 8', answer 7) = 0 + 0.5."""
    completions = ["#### 7", "The answer is: $5", r"so \boxed{x+1}", "it is 7", "no idea", r"\boxed{}"]
    assert make_reward("format")(["q"] * 6, completions).tolist() == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    both = make_reward("math+format")
    assert isinstance(both, SumReward) and both.name == "math+format"
    assert both(["q", "q"], ["#### 7", "maybe 8"], answer=["#### 7", "#### 7"]).tolist() == [2.0, 0.5]
    with pytest.raises(
        RewardSpecError, match=r"^reward 'math\+nonsense': unknown reward 'nonsense'; use 'gold', 'math'"
    ):
        make_reward("math+nonsense")
