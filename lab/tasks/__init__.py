"""Built-in tasks: `TASKS` maps a name to its Task; `get_task(name)` looks one up.

    arith    verifiable   two-digit addition, reward 1 for the exact sum
    reviews  graded       word-level reviews, sentiment minus repetition/length/end penalties
    bandit   bandit       one-token answers with a known reward table and exact optimum π*

Each comes with a tiny base policy in lab/models/<name>/ (see lab/pretrain.py).

Your own enumerable task (one-token answers, a known reward each, so π* and every exact metric work on it):
build a `EnumerableTask` (lab/tasks/enumerable.py) and `register` it; trainers then find it by name.
"""

from __future__ import annotations

from lab.errors import UserError

from .arith import ArithTask
from .bandit import BanditTask
from .base import Task
from .enumerable import EnumerableTask
from .reviews import ReviewsTask

TASKS: dict[str, Task] = {task.name: task for task in (ArithTask(), ReviewsTask(), BanditTask())}


class UnknownTaskError(UserError, ValueError):
    """Raised by get_task for a name that is not a built-in task."""


def get_task(name: str) -> Task:
    """The built-in task called `name`, or an error that lists the built-in names."""
    if name not in TASKS:
        raise UnknownTaskError(
            f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))} "
            "(for your own data use 'jsonl:PATH' or 'hf:ID')"
        )
    return TASKS[name]


BUILTIN_TASKS = tuple(TASKS)


def register(task: Task, *, replace: bool = False) -> Task:
    """Make ``task`` findable by its name (``get_task``, ``--task`` in this process, the trainers' configs).

    A built-in name cannot be taken; registering a name twice needs ``replace=True``. Returns the task."""
    if not task.name or any(c in task.name for c in ":/"):
        raise ValueError(
            f"a task name must be non-empty and hold no ':' or '/' (those mean data sources), got {task.name!r}"
        )
    if task.name in BUILTIN_TASKS:
        raise ValueError(f"{task.name!r} is a built-in task; give yours another name")
    if task.name in TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered; pass replace=True to replace it")
    TASKS[task.name] = task
    return task


__all__ = ["TASKS", "EnumerableTask", "Task", "UnknownTaskError", "get_task", "register"]
