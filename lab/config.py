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

from lab.errors import ConfigError
from lab.trackers import TRACKERS

MODES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")

# Own-model learning rates (TRL's defaults for full fine-tuning are 1e-6; LoRA adapters start at zero and take a
# larger step). The built-in models keep the larger rates in each field's ``builtin`` metadata.
OWN_MODEL_LR = {"full": 1e-6, "lora": 2e-5, "qlora": 2e-5}

# What torch, numpy and random all accept as a seed (numpy's legacy seeding refuses anything outside 32 bits).
SEED_RANGE = (0, 2**32 - 1)

# What a resumed run may set differently from the run it goes on with (plus resume, run_id and out, which name it):
# none of them changes what a step computes.
RESUME_MAY_CHANGE = ("steps", "device", "log_every", "sample_every", "save_every", "eval_every", "report_to")


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
    resume: str | None = opt(
        None,
        "go on with a run from its newest checkpoint (weights, optimizer, random states, data order, step): "
        "its run id under --out, or its folder; the other settings are the run's own",
    )
    report_to: str = opt(
        "none", "also send the metrics to a tracker: none, tensorboard, trackio or wandb", choices=TRACKERS
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
        from lab.trackers import check_tracker

        check_tracker(self.report_to)  # not installed, or W&B not logged in: one line now, before the model loads
        if self.resume is not None:
            self._check_resume()

    def _check_resume(self) -> None:
        """A resumed run keeps its settings: the run exists and has a checkpoint to go on from (see
        `lab.records.find_resume_point`), was trained with this config class, and differs from this config only in
        ``RESUME_MAY_CHANGE``. Fields still None here are resolved by the subclass from fields that match."""
        from lab.records import find_resume_point

        point = find_resume_point(self.resume, self.out)
        name, saved = point.path.name, point.config
        type(self)._check_resumed_class(point)
        check(
            self.run_id in (None, name), "run_id", f"a resumed run keeps its folder {name}, got --run-id {self.run_id}"
        )
        self.run_id = name
        for f in dataclasses.fields(self):
            if f.name in (*RESUME_MAY_CHANGE, "resume", "run_id", "out") or f.name not in saved:
                continue
            value = getattr(self, f.name)
            if value is None and saved[f.name] is not None:
                continue  # resolved after this check, from fields that match
            if _plain(value) != _plain(saved[f.name]):
                raise ConfigError(
                    f"resume: {f.name} is {_short(value)} here but {_short(saved[f.name])} in run {name}; a resumed "
                    f"run keeps its settings except {', '.join(RESUME_MAY_CHANGE)} (in Python: "
                    f"{type(self).__name__}.resuming({name!r}, steps=...))"
                )
        check(
            self.steps > point.step,
            "resume",
            f"run {name} is at step {point.step} already (of {self.steps}); give --steps above {point.step}",
        )

    @classmethod
    def _check_resumed_class(cls, point) -> None:
        """The run at ``point`` (a `lab.records.ResumePoint`) was trained with this config class, or one line."""
        from lab.methods import METHODS

        method = point.config.get("method")
        saved_class = (point.config.get("meta") or {}).get("config_class") or METHODS.get(method, (None, None))[1]
        if saved_class and saved_class != cls.__name__:
            raise ConfigError(
                f"resume: run {point.path.name} was trained with {method} ({saved_class}), not {cls.__name__}; "
                f"resume it with: python -m lab train {method} --resume {point.path.name}"
            )

    @classmethod
    def resuming(cls, run: str, out: str = "runs", **changes) -> BaseConfig:
        """The config that goes on with ``run`` (its id under ``out``, or its folder): the run's own settings, with
        ``changes`` to any of ``RESUME_MAY_CHANGE`` (``GRPOConfig.resuming("grpo-…", steps=200)``)."""
        from lab.records import find_resume_point

        point = find_resume_point(run, out)
        cls._check_resumed_class(point)  # before its settings meet this class's ranges (another method's β...)
        names = {f.name for f in dataclasses.fields(cls)}
        saved = {k: v for k, v in point.config.items() if k in names and k not in ("resume", "run_id", "out")}
        return cls(**{**saved, "out": str(point.path.parent), **changes, "resume": point.path.name})

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
# fields several methods share, with one meaning and one help text: a method's config subclasses the ones it has


@dataclass
class MicrobatchConfig(BaseConfig):
    """Gradient accumulation (SFT, DPO, SFT on preferred, REINFORCE, GRPO)."""

    microbatch_size: int | None = opt(
        None,
        "rows (completions, or preference pairs) per forward/backward, gradients accumulating over the batch; "
        "default: the most that fit in memory (LAB_MICROBATCH_GB)",
        min=1,
        max=1_000_000,
    )


@dataclass
class SampledKLConfig(BaseConfig):
    """kl/ref of the methods that train on fixed rows (SFT, DPO, SFT on preferred): the rows are not samples of
    π_θ, so kl/ref needs fresh ones, kl_prompts generations and two no-grad passes over them every kl_every steps
    (a few % of a step on the built-in models; more on long completions of a large model, where kl_every 10 or 0
    keeps the cost down)."""

    kl_every: int = opt(
        1,
        "log kl/ref = KL(π_θ‖π_ref) every N steps, from one fresh sample of π_θ on each of kl_prompts held-out "
        "prompts, before the step's update (0: never, or only at held-out evaluations where a method has them)",
        min=0,
        max=1_000_000,
    )
    kl_prompts: int = opt(8, "held-out prompts sampled (one completion each) for the per-step kl/ref", min=1, max=4096)


@dataclass
class OfflineConfig(BaseConfig):
    """Training on fixed rows of text (SFT, the reward model, DPO, SFT on preferred answers)."""

    max_length: int = opt(256, "truncate prompt+completion to this many tokens (prompt cut first)", min=2, max=65536)


@dataclass
class PreferenceDataConfig(OfflineConfig):
    """Training on preference pairs (the reward model, DPO, SFT on preferred answers)."""

    task: str = opt(
        "reviews",
        "built-in task with preference pairs (reviews, bandit) or jsonl:PATH / hf:ID of "
        "{prompt, chosen, rejected} rows",
    )
    lr: float | None = opt(
        None,
        "AdamW learning rate; default: 3e-4 on the built-in models, 2e-5 (LoRA/QLoRA) or 1e-6 (full) on your own",
        min=1e-7,
        max=1.0,
        builtin=3e-4,
    )
    batch_size: int = opt(32, "preference pairs per step", min=1, max=4096)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.task != "arith", "task", "arith has no preference pairs; use reviews, bandit or jsonl:PATH")


@dataclass
class PreferencePolicyConfig(PreferenceDataConfig, MicrobatchConfig, SampledKLConfig):
    """A policy trained on preference pairs (DPO, SFT on preferred), evaluated on held-out prompts."""

    eval_every: int = opt(
        0, "held-out kl/ref and eval/gold_reward every N steps (0: at the end only)", min=0, max=1_000_000
    )
    kl_samples: int = opt(8, "completions sampled per held-out prompt for the kl/ref estimate", min=1, max=1024)


@dataclass
class OnPolicyConfig(MicrobatchConfig):
    """The methods that sample their own training data and take the reward from a function (REINFORCE, GRPO)."""

    reward: str = opt("gold", "reward: gold (the task's), a reward-model path, or python:module:function")
    eval_size: int = opt(200, "held-out prompts per evaluation", min=1, max=100_000)
    # at β > 0 π_ref's log-probs are needed anyway and kl/ref is logged every step; at β = 0 the diagnostic costs
    # one no-grad forward pass of π_ref over the rollout (a fifth to a third of a step without sampling)
    kl_every: int = opt(
        1,
        "at β = 0, log kl/ref every N steps from one extra no-grad π_ref pass over the rollout "
        "(0: never, and π_ref is never computed); at β > 0 it is logged every step for free",
        min=0,
        max=1_000_000,
    )


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


def _plain(value: Any) -> Any:
    """``value`` as config.json holds it (tuples as lists, paths as text), to compare a config with a saved one."""
    import json

    return json.loads(json.dumps(value, default=str))


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
