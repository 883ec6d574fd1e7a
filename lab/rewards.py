"""Reward functions: one interface for every source of r(x, y).

A reward function scores a batch of completions::

    reward_fn(prompts: list[str], completions: list[str], truncated: list[bool] | None = None) -> (B,) float32

``completions`` are decoded text without eos; ``truncated[i]`` is True when completion i hit the length cap without
ending (a graded task may penalize that). Every reward function also has a ``name`` (it goes into run records).

``make_reward(spec, task)`` builds one from a spec:

==============================  ========================================================================
spec                            reward
==============================  ========================================================================
``"gold"``                      the task's own ``gold_rewards`` (exact match on arith, the review grader …)
a path to a reward-model run    ``lab.rm.load_reward_model(path)``: a trained scalar model
``"python:module:function"``    any Python function ``f(prompts, completions) -> list[float]``
a Python callable               the same, given directly (notebooks, tests)
==============================  ========================================================================

A Python function may also accept ``truncated=`` as a keyword; it is passed when the function's signature has it.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable, Protocol, runtime_checkable

import torch

from lab.config import ConfigError


@runtime_checkable
class RewardFn(Protocol):
    """What every method calls to score completions."""

    name: str

    def __call__(self, prompts: list[str], completions: list[str],
                 truncated: list[bool] | None = None) -> torch.Tensor:  # (B,) float32
        ...


class RewardSpecError(ConfigError):
    """A reward spec that names nothing usable. The message says which specs exist. A ConfigError, so the CLI
    shows it as one line: the spec is the ``reward`` field of a method's config."""


def _as_tensor(values, n: int, name: str) -> torch.Tensor:
    """A list/array/tensor of n numbers -> (n,) float32 on the CPU, or a one-line error naming the reward."""
    out = torch.as_tensor(values.detach().cpu() if torch.is_tensor(values) else values, dtype=torch.float32)
    out = out.reshape(-1)  # (B,)
    if out.numel() != n:
        raise ValueError(f"reward {name!r} returned {out.numel()} values for {n} completions")
    return out


def _truncated_list(truncated, n: int) -> list[bool]:
    if truncated is None:
        return [False] * n
    return [bool(t) for t in (truncated.tolist() if torch.is_tensor(truncated) else truncated)]


class GoldReward:
    """The task's true reward r(x, y): ``task.gold_rewards(prompts, completions, truncated)``."""

    def __init__(self, task):
        if task is None or not hasattr(task, "gold_rewards"):
            raise RewardSpecError("reward 'gold' needs a built-in task (arith, reviews, bandit); "
                                  "for your own data give a reward model path or python:module:function")
        self.task = task
        self.name = f"gold:{task.name}"

    def __call__(self, prompts, completions, truncated=None) -> torch.Tensor:
        rewards = self.task.gold_rewards(list(prompts), list(completions), _truncated_list(truncated, len(prompts)))
        return _as_tensor(rewards, len(prompts), self.name)  # (B,)


class FunctionReward:
    """Any Python function ``f(prompts, completions[, truncated=...]) -> list[float]`` as a reward function."""

    def __init__(self, fn: Callable, name: str | None = None):
        if not callable(fn):
            raise RewardSpecError(f"reward function {fn!r} is not callable")
        self.fn = fn
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
        try:
            params = inspect.signature(fn).parameters
            self._takes_truncated = "truncated" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):  # builtins without a signature
            self._takes_truncated = False

    def __call__(self, prompts, completions, truncated=None) -> torch.Tensor:
        prompts, completions = list(prompts), list(completions)
        if self._takes_truncated:
            values = self.fn(prompts, completions, truncated=_truncated_list(truncated, len(prompts)))
        else:
            values = self.fn(prompts, completions)
        return _as_tensor(values, len(prompts), self.name)  # (B,)


def _load_python(spec: str) -> FunctionReward:
    """"python:module:function" -> FunctionReward (the module must be importable)."""
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
    """A reward function from a spec (see the module docstring): "gold", a reward-model path,
    "python:module:function", or a callable."""
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text == "gold":
            return GoldReward(task)
        if text.startswith("python:"):
            return _load_python(text)
        if os.path.exists(text):
            from lab.rm import load_reward_model  # lazy: loading a model is heavy and only this spec needs it

            scorer = load_reward_model(text)
            if not getattr(scorer, "name", None):
                try:
                    scorer.name = f"rm:{text}"
                except AttributeError:
                    scorer = FunctionReward(scorer, name=f"rm:{text}")
            return scorer
        raise RewardSpecError(f"unknown reward {text!r}; use 'gold', a reward-model run folder or checkpoint path, "
                              "or python:module:function")
    if callable(spec):
        return spec if isinstance(getattr(spec, "name", None), str) and _returns_tensor(spec) else FunctionReward(spec)
    raise RewardSpecError(f"unknown reward {spec!r}; use 'gold', a reward-model path, python:module:function "
                          "or a callable")


def _returns_tensor(fn) -> bool:
    """Our own reward objects already return (B,) float32 tensors; anything else gets wrapped."""
    return isinstance(fn, (GoldReward, FunctionReward))


__all__ = ["RewardFn", "RewardSpecError", "GoldReward", "FunctionReward", "make_reward"]
