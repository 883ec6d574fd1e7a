"""Reward functions: one interface for every source of r(x, y).

A reward function scores a batch of completions::

    reward_fn(prompts, completions, truncated=None, **columns) -> (B,) float32

- ``prompts``: B prompts, strings or message lists;
- ``completions``: B decoded texts, without eos;
- ``truncated[i]``: True when completion i hit the length cap without ending (a graded task may penalize that);
- ``columns``: the data's extra columns, each a list of B values aligned with the completions (GSM8K's ``answer``,
  from ``lab.data.prompt_columns``), and ``completion_ids`` (B lists of token ids) when the trainer passes them.

Every reward function also has a ``name`` (it goes into run records).

``make_reward(spec, task)`` builds one from a spec:

==============================  ========================================================================
spec                            reward
==============================  ========================================================================
``"gold"``                      the task's own ``gold_rewards`` (exact match on arith, the review grader …)
``"math"``                      1.0 when the completion's final answer equals the row's ``answer``
                                column (GSM8K ``#### 42``, ``\\boxed{42}`` or a number), else 0.0
``"format"``                    1.0 for a final answer in a recognized form (``\\boxed{42}``, ``#### 42``,
                                ``The answer is 42``), 0.5 for a number in another form, 0.0 for none
``"math+format"``               the sum of the rewards of each part (any specs joined by ``+``)
a path to a reward-model run    ``lab.rm.load_reward_model(path)``: a trained scalar model
``"python:module:function"``    any Python function, called the way TRL's GRPOTrainer calls it (below)
a Python callable               the same, given directly (notebooks, tests)
==============================  ========================================================================

A Python function is called like TRL's ``GRPOTrainer`` calls a reward function (trl/trainer/grpo_trainer.py,
``_calculate_rewards``): ``f(prompts=..., completions=..., **columns)``, where every extra dataset column arrives as
a keyword holding a list aligned with the completions, and returns one float per completion. So a TRL function
such as ``def reward(completions, answer, **kwargs)`` works unchanged. The rules, read off the function's signature:

- a function with a parameter named ``prompts``, ``completions`` or ``completion_ids``, or with keyword parameters
  only, is called by keyword (TRL style); any other function gets ``prompts, completions`` as its first two
  positional arguments (the lab's older style, ``f(p, c)``);
- ``truncated`` and each column are passed when the signature names them, and all of them when it has ``**kwargs``;
- a required parameter that no column fills is a one-line error naming it and the columns there are;
- conversational prompts (message lists) come with completions as message lists
  ``[{"role": "assistant", "content": text}]``, as in TRL; string prompts come with string completions.

Unlike TRL, there is no ``trainer_state``, ``log_extra`` or ``log_metric``, and a function must return a number
for every completion (TRL reads ``None`` as "skip this row").
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from lab.config import ConfigError
from lab.errors import UserError


@runtime_checkable
class RewardFn(Protocol):
    """What every method calls to score completions."""

    name: str

    def __call__(
        self, prompts: list, completions: list[str], truncated: list[bool] | None = None, **columns: list
    ) -> torch.Tensor:  # (B,) float32
        ...


class RewardSpecError(ConfigError):
    """A reward spec that names nothing usable, or data without the columns a reward needs. The message is one
    line saying what exists. A ConfigError, so the CLI shows it as one line: the spec is a method's ``reward``."""


class RewardValueError(UserError, ValueError):
    """A reward function returned what no loss can use: None, the wrong number of values, NaN or inf."""


def _as_tensor(values, n: int, name: str) -> torch.Tensor:
    """A list/array/tensor of n numbers -> (n,) float32 on the CPU, or a one-line error naming the reward."""
    if isinstance(values, (list, tuple)) and any(v is None for v in values):
        i = next(i for i, v in enumerate(values) if v is None)
        raise RewardValueError(
            f"reward {name!r} returned None for completion {i}: TRL skips such rows, the lab needs a "
            "number for every completion"
        )
    out = torch.as_tensor(values.detach().cpu() if torch.is_tensor(values) else values, dtype=torch.float32)
    out = out.reshape(-1)  # (B,)
    if out.numel() != n:
        raise RewardValueError(f"reward {name!r} returned {out.numel()} values for {n} completions")
    return out


def _truncated_list(truncated, n: int) -> list[bool]:
    if truncated is None:
        return [False] * n
    return [bool(t) for t in (truncated.tolist() if torch.is_tensor(truncated) else truncated)]


def _check_columns(columns: dict, n: int, name: str) -> None:
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"reward {name!r}: column {key!r} has {len(values)} values for {n} completions")


def _column_names(columns) -> str:
    """How the error messages list the data's columns."""
    names = [key for key in columns if key not in ("prompts", "completions", "truncated", "completion_ids")]
    return f"columns {', '.join(names)}" if names else "no extra columns (only prompts and completions)"


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions


class GoldReward:
    """The task's true reward r(x, y): ``task.gold_rewards(prompts, completions, truncated)``. Columns are ignored:
    a built-in task knows its own answers."""

    def __init__(self, task):
        if task is None or not hasattr(task, "gold_rewards"):
            raise RewardSpecError(
                "reward 'gold' needs a built-in task (arith, reviews, bandit); "
                "for your own data use 'math', a reward model path or python:module:function"
            )
        self.task = task
        self.name = f"gold:{task.name}"

    def __call__(self, prompts, completions, truncated=None, **columns) -> torch.Tensor:
        rewards = self.task.gold_rewards(list(prompts), list(completions), _truncated_list(truncated, len(prompts)))
        return _as_tensor(rewards, len(prompts), self.name)  # (B,)


class FunctionReward:
    """Any Python function as a reward function, called as TRL calls one (see the module docstring).

    Naive equivalent, for a TRL-style function: ``fn(prompts=prompts, completions=completions, **columns)``; this
    class also serves the lab's positional ``fn(prompts, completions)`` and passes only what the signature takes.
    """

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn  # callable: make_reward checks it before it builds one
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
        try:
            self._params = dict(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # builtins without a signature: fn(prompts, completions)
            self._params = None

    def __call__(self, prompts, completions, truncated=None, **columns) -> torch.Tensor:
        prompts, completions = list(prompts), list(completions)
        n = len(prompts)
        _check_columns(columns, n, self.name)
        if prompts and isinstance(prompts[0], list):  # conversational, as TRL: a completion is a message list
            completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
        args, kwargs = self._arguments(prompts, completions, {"truncated": _truncated_list(truncated, n), **columns})
        return _as_tensor(self.fn(*args, **kwargs), n, self.name)  # (B,)

    def _arguments(self, prompts: list, completions: list, available: dict) -> tuple[tuple, dict]:
        """(positional args, keyword args) for ``self.fn``, from what its signature names."""
        if self._params is None:
            return (prompts, completions), {}
        P = inspect.Parameter
        named = [key for key, p in self._params.items() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
        positional = [key for key, p in self._params.items() if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        var_kw = any(p.kind is P.VAR_KEYWORD for p in self._params.values())
        var_pos = any(p.kind is P.VAR_POSITIONAL for p in self._params.values())
        if {"prompts", "completions", "completion_ids"} & set(named) or not (positional or var_pos):
            # TRL style: everything by keyword (TRL's own `f(completion_ids, **kwargs)` and `f(**kwargs)` too)
            args, kwargs = (), {}
            for key, value in (("prompts", prompts), ("completions", completions)):
                if key in named or var_kw:
                    kwargs[key] = value
            taken = {"prompts", "completions"}
        else:  # lab style: f(prompts, completions, ...) whatever the two are called
            args, kwargs = (prompts, completions), {}
            taken = set(positional[:2])
        for key, value in available.items():
            if key not in taken and key not in ("prompts", "completions") and (key in named or var_kw):
                kwargs[key] = value
        for key in named:
            if key not in taken and key not in kwargs and self._params[key].default is P.empty:
                raise RewardSpecError(
                    f"reward {self.name!r} needs column {key!r}, but the data has {_column_names(available)}"
                )
        return args, kwargs


class ModelReward:
    """A reward model's scorer (``lab.rm.RewardScorer``) behind the common interface. It scores the text of prompt
    and completion, so the data's columns are dropped; every other attribute (``model``, ``tokenizer``) is the
    scorer's."""

    def __init__(self, scorer, name: str):
        self.scorer = scorer
        self.name = name

    def __call__(self, prompts, completions, truncated=None, **columns) -> torch.Tensor:
        return self.scorer(list(prompts), list(completions), truncated)  # (B,)

    def __getattr__(self, attr):
        if attr == "scorer":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.scorer, attr)


class SumReward:
    """r(x, y) = Σ_k r_k(x, y): several reward functions on the same completions ("math+format").

    Naive equivalent: ``sum(part(prompts, completions, truncated, **columns) for part in parts)``.
    """

    def __init__(self, parts: list):
        self.parts = parts
        self.name = "+".join(part.name for part in parts)

    def __call__(self, prompts, completions, truncated=None, **columns) -> torch.Tensor:
        n = len(prompts)
        values = [_as_tensor(part(prompts, completions, truncated, **columns), n, part.name) for part in self.parts]
        return torch.stack(values).sum(0)  # (K, B) -> (B,)


# ----------------------------------------------------------------------------------------------------------------------
# Verifiable math rewards: "math" and "format"

# A number as written in a solution: -12, 1,000, 3.5, .5, $5. Not the digits inside a word or after a decimal point
# ("x2", "3.14" is one number), and a minus sign only when no word comes before it ("3-5" holds 3 and 5, not -5).
_NUMBER = re.compile(r"(?<![\w.])(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_FINAL_FORM = re.compile(r"(?:####|(?i:the\s+(?:final\s+)?answer\s+is)\s*:?)\s*\$?\s*-?\$?\s*\d")
_FRACTION = re.compile(r"^\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced; None if none.

    ``r"so \boxed{\frac{1}{2}}."`` -> ``r"\frac{1}{2}"``. Naive equivalent: ``re.findall(r"\\boxed\{(.*?)\}", text)[-1]``,
    which stops at the first "}" and cuts ``\frac{1}{2}`` to ``\frac{1``.
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, content_start = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[content_start:i].strip()
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def reference_answer(answer) -> str:
    """The final answer of a dataset's reference: the text after the last ``####`` (GSM8K, commas removed), else the
    last ``\\boxed{}`` (MATH solutions), else the whole value as text (a plain number such as 42 or "42")."""
    text = str(answer)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    return boxed if boxed is not None else text.strip()


def completion_answer(completion: str) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}`` if any, else the last number; None if neither."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def to_number(text: str) -> float | None:
    r"""A final answer as a float, None if it is not a number: "1,000" -> 1000, "$5" -> 5, "42.0" -> 42,
    "-3" -> -3, "50\%" -> 50, r"\frac{1}{2}" and "1/2" -> 0.5, r"18 \text{ dollars}" -> 18."""
    text = re.sub(r"\\text\{[^{}]*\}|\\[,!;]|\\left|\\right|\^\\circ|\\%|[$%\s]", "", str(text))
    text = text.replace("\\$", "").replace(",", "").rstrip(".")
    fraction = _FRACTION.match(text) or re.match(r"^(-?[\d.]+)/([\d.]+)$", text)
    try:
        if fraction:
            return float(fraction.group(1)) / float(fraction.group(2))
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Equal as numbers (relative tolerance 1e-6) when both are numbers, else equal as text without spaces or $."""
    if predicted is None:
        return False
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return _plain(predicted) == _plain(reference)


def _plain(text: str) -> str:
    """Answer text compared as text: without spaces, $ and LaTeX sizing."""
    return re.sub(r"[\s$]|\\left|\\right|\\!", "", str(text)).rstrip(".")


def _text_of(completion) -> str:
    """A completion's text: the string, or the content of its last message (conversational)."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def math_reward(completions: list, answer: list | None = None, solution: list | None = None, **kwargs) -> list[float]:
    """1.0 when a completion's final answer equals its row's reference, else 0.0. TRL-style: it works in TRL too.

    The reference is the ``answer`` column (GSM8K: "... #### 42"), else the ``solution`` column (MATH: "...
    \\boxed{42}"), read by ``reference_answer``; the completion's answer is ``completion_answer``'s.
    """
    references = answer if answer is not None else solution
    if references is None:
        raise RewardSpecError(
            "reward 'math' needs an 'answer' column (GSM8K: '... #### 42', or a number) or a "
            f"'solution' column with \\boxed{{}}, but the data has {_column_names(kwargs)}"
        )
    return [
        float(answers_match(completion_answer(_text_of(c)), reference_answer(ref)))
        for c, ref in zip(completions, references)
    ]


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 for a final answer in a recognized form (``\\boxed{...}`` not empty, "#### 42", "The answer is 42"), 0.5
    for a completion with a number in no such form, 0.0 for one without a number. TRL-style, like ``math_reward``."""
    rewards = []
    for completion in completions:
        text = _text_of(completion)
        if last_boxed(text) or _FINAL_FORM.search(text):
            rewards.append(1.0)
        else:
            rewards.append(0.5 if _NUMBER.search(text) else 0.0)
    return rewards


BUILTIN_REWARDS = {"math": math_reward, "format": format_reward}


# ----------------------------------------------------------------------------------------------------------------------
# Specs


def _load_python(spec: str) -> FunctionReward:
    """ "python:module:function" -> FunctionReward (the module must be importable)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise RewardSpecError(f"bad reward spec {spec!r}; write python:module:function, e.g. python:my_rewards:score")
    _, module_name, fn_name = parts
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardSpecError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise RewardSpecError(f"reward {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return FunctionReward(fn, name=spec)


def make_reward(spec, task=None) -> RewardFn:
    """A reward function from a spec (see the module docstring): "gold", "math", "format", specs joined by "+",
    a reward-model path, "python:module:function", or a callable."""
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text == "gold":
            return GoldReward(task)
        if text in BUILTIN_REWARDS:
            return FunctionReward(BUILTIN_REWARDS[text], name=text)
        if text.startswith("python:"):
            return _load_python(text)
        if os.path.exists(text):
            from lab.rm import load_reward_model  # lazy: loading a model is heavy and only this spec needs it

            scorer = load_reward_model(text)
            return ModelReward(scorer, getattr(scorer, "name", None) or f"rm:{text}")
        if "+" in text and all(part.strip() for part in text.split("+")):
            try:
                return SumReward([make_reward(part.strip(), task) for part in text.split("+")])
            except RewardSpecError as err:
                raise RewardSpecError(f"reward {text!r}: {err}") from None
        raise RewardSpecError(
            f"unknown reward {text!r}; use 'gold', 'math', 'format', a reward-model run folder or "
            "checkpoint path, python:module:function, or several joined by '+'"
        )
    if isinstance(spec, (GoldReward, FunctionReward, ModelReward, SumReward)):
        return spec
    if hasattr(spec, "model") and hasattr(spec, "tokenizer") and callable(spec):  # a reward model's scorer
        return ModelReward(spec, getattr(spec, "name", None) or type(spec).__name__)
    if callable(spec):
        return FunctionReward(spec)
    raise RewardSpecError(
        f"unknown reward {spec!r}; use 'gold', 'math', 'format', a reward-model path, "
        "python:module:function or a callable"
    )


__all__ = [
    "FunctionReward",
    "GoldReward",
    "ModelReward",
    "RewardFn",
    "RewardSpecError",
    "RewardValueError",
    "SumReward",
    "answers_match",
    "completion_answer",
    "format_reward",
    "last_boxed",
    "make_reward",
    "math_reward",
    "reference_answer",
    "to_number",
]
