"""The reward-function interface: every spec gives a callable returning (B,) float32 with a name."""

import sys
import types

import pytest
import torch

from lab.rewards import FunctionReward, GoldReward, RewardFn, RewardSpecError, make_reward
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
        scorer = lambda prompts, completions, truncated=None: torch.ones(len(prompts))  # noqa: E731
        return scorer

    fake_rm = types.ModuleType("lab.rm")
    fake_rm.load_reward_model = fake_loader
    monkeypatch.setitem(sys.modules, "lab.rm", fake_rm)
    reward = make_reward(str(tmp_path))
    assert calls == [str(tmp_path)]
    assert reward(["a"], ["b"]).tolist() == [1.0]
    assert reward.name.startswith("rm:")


@pytest.mark.parametrize("spec,words", [
    ("nonsense", "unknown reward"),
    ("python:only_module", "python:module:function"),
    ("python:no_such_module_xyz:f", "cannot import"),
    ("python:os:no_such_function", "has no function"),
    (42, "unknown reward"),
])
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
