"""The one exception type for mistakes a user can fix.

A bad flag value, a run id with a slash, a missing or corrupt model, a malformed data row, a reward that returns NaN,
a full disk: each raises a subclass of :class:`UserError` whose message is one line saying what is wrong and what to
change. The CLI prints that line and exits with code 2; the app shows it in its status box. Anything else is a bug
and keeps its traceback.

The subclasses live next to the code that raises them (ConfigError here, below every module that raises it) and also derive from the built-in type that fits, so older
``except ValueError`` / ``except OSError`` code still catches them:

    ConfigError      here               a hyperparameter out of range (RewardSpecError: a bad reward spec)
    DataError        lab/data.py        a data file or row that cannot be used
    ModelNotFound    lab/modeling.py    no such model, locally or on the hub
    BadModelFiles    lab/modeling.py    a model folder whose weights or tokenizer cannot be used
    UnknownTaskError lab/tasks          a task name that is neither built in nor a data source
    RewardValueError lab/rewards.py     a reward function that returned NaN or inf
    RunTargetError   lab/records.py     a run id or --out that cannot hold the run
    DiskFull         lab/records.py     no space left while writing the record
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or environment. ``str(err)`` is one line meant for the user."""


class ConfigError(UserError, ValueError):
    """A hyperparameter is out of range. The message names the field and what to change (``lab.config.check``)."""
