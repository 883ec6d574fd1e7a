"""Configuration shared by every method.

Each method file defines its own dataclass that subclasses :class:`BaseConfig`. Three rules hold for all of them:

* every field carries a one-line ``help`` in its metadata — the CLI turns it into ``--flag`` help text and the
  Gradio app into a tooltip, so a field is documented exactly once;
* ``__post_init__`` validates, and a bad value raises :class:`ConfigError` naming the field, the allowed range and
  how to fix it;
* defaults run on a laptop CPU in about a minute on the built-in tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lab.errors import UserError

MODES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")

# Own-model learning rates (TRL's defaults for full fine-tuning are 1e-6; LoRA adapters start at zero and take a
# larger step). The built-in models keep the larger rates in each field's ``builtin`` metadata.
OWN_MODEL_LR = {"full": 1e-6, "lora": 2e-5, "qlora": 2e-5}

# What torch, numpy and random all accept as a seed (numpy's legacy seeding refuses anything outside 32 bits).
SEED_RANGE = (0, 2**32 - 1)


class ConfigError(UserError, ValueError):
    """A hyperparameter is out of range. The message names the field and what to change."""


def check(ok: bool, name: str, message: str) -> None:
    """Raise ``ConfigError("<name>: <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}: {message}")


def opt(default: Any, help: str, **range_) -> Any:
    """A dataclass field with help text and, optionally, a UI range: ``opt(0.1, "KL weight", min=0, max=1)``."""
    return field(default=default, metadata={"help": help, **range_})


@dataclass
class BaseConfig:
    """Fields every trainer understands: what to train, how to load it, how long, and where to record it."""

    # what to train on
    task: str = opt("arith", "built-in task (arith, reviews, bandit) or a data source: jsonl:PATH, PATH.jsonl, hf:ID")
    model: str | None = opt(None, "builtin name, local path or hub id; default: the task's built-in model")
    # how the weights are trained
    mode: str = opt("lora", "full (all weights), lora (peft adapters) or qlora (4-bit nf4 base + adapters)")
    lora_r: int = opt(16, "LoRA rank", min=1, max=256)
    lora_alpha: int = opt(32, "LoRA scale numerator (the update is scaled by alpha / r)", min=1, max=512)
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch", min=0.0, max=0.9)
    lr: float | None = opt(
        None,
        "AdamW learning rate; default: 1e-3 on the built-in models, 2e-5 (LoRA/QLoRA) or 1e-6 (full) on your own",
        min=1e-7,
        max=1.0,
        builtin=1e-3,
    )
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0, max=1.0)
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 disables)", min=0.0, max=100.0)
    steps: int = opt(50, "optimizer steps (for RL: one rollout + update per step)", min=1, max=1_000_000)
    batch_size: int = opt(16, "prompts or rows per step", min=1, max=4096)
    seed: int = opt(0, "random seed for data order, sampling and initialisation", min=SEED_RANGE[0], max=SEED_RANGE[1])
    # sampling
    max_new_tokens: int | None = opt(None, "completion length cap; default: the task's own", min=1, max=4096)
    temperature: float = opt(1.0, "sampling temperature for rollouts", min=0.05, max=5.0)
    top_p: float = opt(1.0, "nucleus sampling threshold for rollouts", min=0.01, max=1.0)
    # recording
    out: str = opt("runs", "folder that holds run records")
    run_id: str | None = opt(None, "name of this run's folder under --out; default: method-date-time-hex")
    log_every: int = opt(1, "write metrics every N steps", min=1, max=100_000)
    sample_every: int = opt(10, "write samples every N steps (0: only at the end)", min=0, max=100_000)
    # 50: a kill (SIGKILL, out of memory) loses at most 50 steps, and the checkpoint is overwritten, not accumulated
    save_every: int = opt(
        50,
        "save the adapter/weights to checkpoints/latest every N steps, replacing the previous one (0: only at the end)",
        min=0,
        max=1_000_000,
    )
    eval_size: int = opt(64, "held-out prompts used for before/after evaluation", min=1, max=100_000)
    # loading
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    trust_remote_code: bool = opt(False, "allow model code from the hub (off unless you trust the repository)")
    # memory and speed on real models
    gradient_checkpointing: bool | None = opt(
        None,
        "recompute activations in the backward pass (less memory, about "
        "a third more compute); default: on for your own model on a GPU",
    )
    optim: str = opt(
        "adamw", "optimizer: adamw (torch), adamw_8bit or paged_adamw_8bit (bitsandbytes, GPU)", choices=OPTIMIZERS
    )
    skip_bad_rows: bool = opt(False, "skip and count malformed data rows instead of stopping at the first one")

    def __post_init__(self) -> None:
        check_types(self)  # first: every check below may then trust a field's type
        check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        from lab.data import is_data_source
        from lab.tasks import TASKS

        check(
            self.task in TASKS or is_data_source(self.task),
            "task",
            f"unknown task {self.task!r}; built-in tasks: {', '.join(sorted(TASKS))} (for your own data use "
            "jsonl:PATH, a .jsonl/.json/.parquet/.csv file, a saved dataset folder or hf:ID)",
        )
        check(self.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if getattr(self, "lr", 0) is None:
            # tiny built-in models learn at 1e-3; a real model's LoRA at that rate diverges in a few steps
            builtin = next(f.metadata.get("builtin") for f in dataclasses.fields(self) if f.name == "lr")
            self.lr = builtin if self.uses_builtin_model() else OWN_MODEL_LR[self.mode]
        self._check_ranges()
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        from lab.modeling import pick_device

        pick_device(self.device)  # cuda on a machine without a GPU: one line now, not a traceback at load time

    def _check_ranges(self) -> None:
        """Check every field's type (see `check_types`), then every numeric field against the ``min``/``max`` in its
        metadata; a field named ``seed`` without a range gets ``SEED_RANGE``."""
        check_types(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if f.name == "seed" and lo is None and hi is None:
                lo, hi = SEED_RANGE
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value != value:  # NaN compares unequal to itself
                raise ConfigError(f"{f.name}: must be a number, got NaN")
            if lo is not None and hi is not None:
                check(lo <= value <= hi, f.name, f"must be in [{lo}, {hi}], got {value}")
            elif lo is not None:
                check(value >= lo, f.name, f"must be ≥ {lo}, got {value}")
            elif hi is not None:
                check(value <= hi, f.name, f"must be ≤ {hi}, got {value}")

    def uses_builtin_model(self) -> bool:
        """True when the policy is one of the lab's tiny built-in models (no --model, or a built-in name)."""
        from lab.modeling import builtin_models

        return self.model is None or self.model in builtin_models()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> BaseConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------------------
# types


@functools.cache
def _declared_types(cls: type) -> dict[str, tuple[Any, bool]]:
    """``{field: (base type, None allowed)}``: ``int | None`` → ``(int, True)``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
        out[f.name] = (_base_type(tp), union and type(None) in typing.get_args(tp))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_types(cfg: Any) -> None:
    """Raise ConfigError unless every field holds its declared type.

    The CLI's argparse types and the app's ``coerce`` convert text before a config is built; the Python API does
    not, so ``trust_remote_code="false"`` (a non-empty string, hence true) or ``steps="50"`` must be refused here.
    The rules: a bool field takes only True/False; an int field takes whole numbers but not bools (True is an int in
    Python) nor 1.5; a float field takes ints too; a str field takes a path (``out=tmp_path``), kept as its text;
    None only where the field is declared ``X | None``.
    """
    for name, (tp, optional) in _declared_types(type(cfg)).items():
        value = getattr(cfg, name)
        if value is None:
            check(optional, name, f"needs a value ({tp.__name__}), got None")
            continue
        if tp is bool:
            ok, expected = isinstance(value, bool), "true or false (a bool)"
        elif tp is int:
            ok, expected = isinstance(value, numbers.Integral) and not isinstance(value, bool), "a whole number (int)"
        elif tp is float:
            ok, expected = isinstance(value, numbers.Real) and not isinstance(value, bool), "a number (float)"
        elif tp is str:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(cfg, name, value)
            ok, expected = isinstance(value, str), "text (str)"
        else:
            continue
        check(ok, name, f"must be {expected}, got {_short(value)} ({type(value).__name__})")


# ----------------------------------------------------------------------------------------------------------------------
# dataclass <-> argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line with a hint instead of the whole usage block: ``--bogus-flag`` →
    ``error: unrecognized arguments: --bogus-flag (see: python -m lab train grpo --help)``, and a misspelt flag
    gets the closest real one."""

    def error(self, message: str):
        hint = f"see: {self.prog} --help"
        if message.startswith("unrecognized arguments: "):
            flags = [a.split("=")[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")]
            close = difflib.get_close_matches(flags[0], list(self._option_string_actions), n=1) if flags else []
            if close:
                hint = f"did you mean {close[0]}? {hint}"
        self.exit(2, f"error: {message} ({hint})\n")


def _base_type(tp: Any) -> Any:
    """``int | None`` → ``int``; ``str`` → ``str``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field, with the same name: ``group_size`` → ``--group-size`` (``--group_size`` works too)."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        tp = types_[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        help_ = f.metadata.get("help", "") + f" (default: {default})"
        if tp is bool:
            parser.add_argument(
                *names, dest=f.name, type=_parse_bool, nargs="?", const=True, default=argparse.SUPPRESS, help=help_
            )
        else:
            parser.add_argument(
                *names,
                dest=f.name,
                type=tp if tp in (int, float) else str,
                default=argparse.SUPPRESS,
                help=help_,
                metavar=f.name.upper(),
            )


def config_from_args(cls: type, args: argparse.Namespace, **extra) -> Any:
    """Build ``cls`` from the flags that were given; anything not given keeps the dataclass default."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(extra)
    return cls(**given)


def describe_fields(cls: type) -> list[dict]:
    """Field name, type, default, help and range — what the app builds its controls from."""
    types_ = field_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        rows.append(
            {
                "name": f.name,
                "type": types_[f.name],
                # fields resolved in __post_init__ show the built-in models' value (the app runs on them)
                "default": f.metadata.get("builtin", f.default if f.default is not dataclasses.MISSING else None),
                "help": f.metadata.get("help", ""),
                "min": f.metadata.get("min"),
                "max": f.metadata.get("max"),
                "choices": f.metadata.get("choices"),
            }
        )
    return rows
