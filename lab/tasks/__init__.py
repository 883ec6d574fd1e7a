"""Built-in tasks: `TASKS` maps a name to its Task; `get_task(name)` looks one up.

    arith    verifiable   two-digit addition, reward 1 for the exact sum
    reviews  graded       word-level reviews, sentiment minus repetition/length/end penalties
    bandit   bandit       one-token answers with a known reward table and exact optimum π*

Each comes with a tiny base policy in lab/models/<name>/ (see lab/pretrain.py).
"""

from __future__ import annotations

from .arith import ArithTask
from .bandit import BanditTask
from .base import Task
from .reviews import ReviewsTask

TASKS: dict[str, Task] = {task.name: task for task in (ArithTask(), ReviewsTask(), BanditTask())}


class UnknownTaskError(ValueError):
    """Raised by get_task for a name that is not a built-in task."""


def get_task(name: str) -> Task:
    """The built-in task called `name`, or an error that lists the built-in names."""
    if name not in TASKS:
        raise UnknownTaskError(
            f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))} "
            "(for your own data use 'jsonl:PATH' or 'hf:ID')"
        )
    return TASKS[name]


__all__ = ["TASKS", "Task", "UnknownTaskError", "get_task"]
