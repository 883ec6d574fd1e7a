"""Running a trainer in the background and watching it step by step: what the app needs, minus the widgets.

A :class:`Job` runs one trainer generator (``train(cfg, policy=..., stop=..., record=...)``) in a thread. Each
step's metrics dict is appended to ``job.history`` as soon as the trainer yields it, and ``job.wait(seen)`` wakes
whoever watches as soon as there is something new, so a UI can redraw once per step without polling the disk.
The policy is loaded here, not inside the trainer, so that after the run the tuned policy is still in hand for a
before/after comparison and the per-token view.

A :class:`Session` is what one browser tab keeps between clicks: its current job, the last trained policy and
the latest samples. Nothing here imports a UI library.

    session = Session()
    job = start(session, "sft", {"task": "arith", "steps": 20})   # ConfigError / DataError raise right here
    while not job.done:
        job.wait(len(job.history), timeout=1.0)
        print(job.history[-1] if job.history else job.phase)
    rows, summary = compare(session)                                # before / after on held-out prompts
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lab.errors import UserError

log = logging.getLogger("lab.live")

# Fields a UI sets from its own controls rather than from the config's panel.
SHARED_FIELDS = ("task", "model", "mode", "out")


# ----------------------------------------------------------------------------------------------------------------------
# Errors a user can fix: shown as one line, never as a traceback


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user: every ``lab.errors.UserError`` (bad value, bad data,
    missing model, bad run id, full disk...) and running out of GPU memory."""
    from lab.errors import UserError

    return (UserError, torch.OutOfMemoryError)


def user_message(err: BaseException) -> str:
    """One line that says what went wrong and what to change. Never a traceback."""
    if isinstance(err, torch.OutOfMemoryError):
        return (
            "out of memory: lower batch_size, group_size or max_new_tokens, or train with LoRA / 4-bit "
            "instead of full fine-tuning"
        )
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(err, user_errors()):
        return first or type(err).__name__
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Building a config from loose UI values


def coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Turn widget values into the types the config declares: ``2.0`` → ``2`` for an int field, ``""`` → ``None``
    for an optional field. A value that cannot be converted raises ``ConfigError`` naming the field."""
    from lab.config import ConfigError, field_types

    types_ = field_types(cls)
    optional = {f.name for f in dataclasses.fields(cls) if f.default is None}
    out = {}
    for name, value in values.items():
        if name not in types_:
            raise ConfigError(f"{name}: not a setting of {cls.__name__}")
        tp = types_[name]
        if value is None or (isinstance(value, str) and value.strip() == ""):
            if name in optional:
                out[name] = None
                continue
            if tp is str:
                out[name] = ""
                continue
            raise ConfigError(f"{name}: needs a value{_range_text(cls, name)}")
        try:
            if tp is bool:
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            elif tp is int:
                number = float(value)
                if not number.is_integer():
                    raise ConfigError(f"{name}: must be a whole number, got {value}")
                value = int(number)
            elif tp is float:
                value = float(value)
            elif tp is str:
                value = str(value).strip()
        except (TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
        out[name] = value
    return out


def _range_text(cls: type, name: str) -> str:
    """The range ``in [lo, hi]`` from a field's metadata, or an empty string when it declares none."""
    meta = next((f.metadata for f in dataclasses.fields(cls) if f.name == name), {})
    lo, hi = meta.get("min"), meta.get("max")
    return f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""


def check_count(name: str, value: Any, lo: int, hi: int, why: str = "") -> int:
    """A whole number in [lo, hi] from a widget value, else the config's one-line range error (no clamping)."""
    from lab.config import ConfigError

    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{name}: needs a value in [{lo}, {hi}]")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected int, got {value!r}") from None
    if not number.is_integer():
        raise ConfigError(f"{name}: must be a whole number, got {value}")
    if not lo <= number <= hi:
        raise ConfigError(f"{name}: must be in [{lo}, {hi}]{why}, got {int(number)}")
    return int(number)


# ----------------------------------------------------------------------------------------------------------------------
# Serving to others: what a shared app (--share, or a host other than localhost) refuses

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SHARED_MAX_STEPS = 500  # default cap on steps per run on a shared app (--max-steps)
SHARED_MAX_QUEUE = 2  # default cap on one user's launches waiting or running (--max-queue)
PATH_FIELDS = ("task", "ptx_data")  # data sources: built-in names, hf:ID, uploads
MODEL_FIELDS = ("model", "reward_model")  # models: built-in names, hub ids
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class NotServed(UserError):
    """A value a shared app does not accept (a server path, code to import, remote code, too many steps)."""


def is_shared(host: str, share: bool) -> bool:
    """Whether the app is reachable by others: a public link, or listening on anything but the loopback."""
    return share or host not in LOCAL_HOSTS


def check_shared_inputs(
    values: dict[str, Any], allow_local: bool = False, max_steps: int | None = None, served: tuple[str, ...] = ()
) -> None:
    """Raise ``NotServed`` for what a shared app must not take from a stranger, else return None.

    Refused unless ``allow_local``: any data source but a built-in task, ``hf:ID`` or one of ``served`` (the
    tab's upload, the app's own reward-model runs); any model but a built-in name or a hub id; any reward but the
    built-in ones (gold, math, format, joined by "+") and ``served``; ``trust_remote_code``. Always: more than
    ``max_steps`` steps. Each message is the same whether or not the path exists on the server.
    """
    if not allow_local:
        _check_no_local(values, served)
    steps = values.get("steps")
    if max_steps is not None and isinstance(steps, (int, float)) and steps > max_steps:
        raise NotServed(f"steps: at most {max_steps} per run on a shared app, got {steps:g}")


def _check_no_local(values: dict[str, Any], served: tuple[str, ...]) -> None:
    from lab.modeling import builtin_models
    from lab.rewards import BUILTIN_REWARDS
    from lab.tasks import TASKS

    for name in PATH_FIELDS:
        value = str(values.get(name) or "").strip()
        if value and value not in TASKS and value not in served and not _hub_source(value):
            raise NotServed(
                f"{name}: local paths are not served on a shared app; use a built-in task "
                f"({', '.join(sorted(TASKS))}), an upload or hf:ID"
            )
    for name in MODEL_FIELDS:
        value = str(values.get(name) or "").strip()
        if value and value not in builtin_models() and not (HUB_ID.fullmatch(value) and not Path(value).exists()):
            raise NotServed(f"{name}: local paths are not served on a shared app; use a built-in model or a hub id")
    reward = str(values.get("reward") or "").strip()
    parts = [part.strip() for part in reward.split("+")] if reward and reward not in served else []
    if any(part.startswith("python:") for part in parts):
        raise NotServed("reward: python: rewards are not served on a shared app")
    if any(part != "gold" and part not in BUILTIN_REWARDS for part in parts):
        raise NotServed(
            "reward: local paths are not served on a shared app; use gold, "
            f"{', '.join(sorted(BUILTIN_REWARDS))} or a reward model this app trained"
        )
    if values.get("trust_remote_code") is True:
        raise NotServed("trust_remote_code: remote code is not run on a shared app")


def _hub_source(value: str) -> bool:
    """``hf:ID`` (``hf:ID:CONFIG:SPLIT``) whose ID has a hub id's shape and names no folder on this machine."""
    ident = value[3:].split(":", 1)[0] if value.startswith("hf:") else ""
    return bool(HUB_ID.fullmatch(ident) or re.fullmatch(r"[A-Za-z0-9][\w.-]*", ident)) and not Path(ident).exists()


@dataclass(frozen=True)
class Serving:
    """Who the app serves. Local (the default) refuses nothing; shared applies ``check_shared_inputs`` unless
    ``allow_local``, and caps steps per run and one user's launches waiting or running."""

    shared: bool = False
    allow_local: bool = False
    max_steps: int = SHARED_MAX_STEPS
    max_queue: int = SHARED_MAX_QUEUE

    @property
    def hidden_fields(self) -> tuple[str, ...]:
        return ("trust_remote_code",) if self.shared and not self.allow_local else ()

    def check(self, values: dict[str, Any], served: tuple[str, ...] = ()) -> None:
        if self.shared:
            check_shared_inputs(values, self.allow_local, self.max_steps, served)


def check_queue(waiting_or_running: int, max_queue: int) -> None:
    """Raise ``NotServed`` when one user already has ``max_queue`` launches waiting or running."""
    if waiting_or_running >= max_queue:
        raise NotServed(
            f"queue: you already have {waiting_or_running} run(s) waiting or running, the most a shared "
            "app takes from one user; wait for one to end"
        )


# ----------------------------------------------------------------------------------------------------------------------
# A training job


@dataclass
class Job:
    """One trainer generator running in a thread; ``history`` grows by one metrics dict per step."""

    method: str
    cfg: Any
    train_fn: Any
    policy: Any = None  # set once loaded (kept after the run for before/after)
    task: Any = None  # the built-in Task, or None for user data
    record_path: Path | None = None
    history: list[dict] = field(default_factory=list)
    phase: str = "starting"  # starting → loading → running → completed | stopped | failed
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    first_step_at: float | None = None
    ended: float | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    # --- running ------------------------------------------------------------------------------------------------------

    def start(self) -> Job:
        self._thread = threading.Thread(target=self._main, name=f"lab-{self.method}", daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        from lab.runner import load_for, open_record

        record = None
        try:
            self._set_phase("loading")
            if self.policy is None and uses_policy(self.method):
                self.policy = load_for(self.cfg, self.task)
            record = open_record(self.cfg, self.method)  # a new folder, or a resumed run's own (cfg.resume)
            self.record_path = record.path
            self._set_phase("running")
            kwargs = {"stop": self.stop, "record": record}
            if self.policy is not None:
                kwargs["policy"] = self.policy
            for metrics in self.train_fn(self.cfg, **kwargs):
                with self._cond:
                    if self.first_step_at is None:
                        self.first_step_at = time.time()
                    self.history.append(dict(metrics))
                    self._cond.notify_all()
            status = (record.status.get("status") if record is not None else None) or "completed"
            self._set_phase(
                "stopped"
                if status == "stopped" or (self.stop.is_set() and len(self.history) < self.cfg.steps)
                else "completed"
            )
        except BaseException as err:  # noqa: BLE001 - the thread must always report back
            if not isinstance(err, user_errors()):
                log.error("run %s failed:\n%s", self.method, traceback.format_exc())
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.error = user_message(err)
            if record is not None and not record.finished:  # the trainer failed before its own record took over
                record.finish("failed", error=self.error)
            if record is not None and isinstance(err, UserError) and not self.history and not self.cfg.resume:
                # a bad reward or bad data, refused before the first step: no run to keep, only the message (a
                # resumed run's folder holds its earlier steps, and stays)
                shutil.rmtree(record.path, ignore_errors=True)
                self.record_path = None
            self._set_phase("failed")
        finally:
            with self._cond:
                self.ended = time.time()
                self._cond.notify_all()

    def _set_phase(self, phase: str) -> None:
        with self._cond:
            self.phase = phase
            self._cond.notify_all()

    # --- watching -----------------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.ended is not None

    def wait(self, seen: int, timeout: float | None = None) -> bool:
        """Block until more than ``seen`` steps exist or the job ended; True if there is something new."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.history) > seen or self.done, timeout=timeout)
            return len(self.history) > seen or self.done

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def request_stop(self) -> None:
        """The trainer finishes the step it is in, writes its record as ``stopped`` and ends."""
        self.stop.set()

    def progress(self) -> dict:
        """Steps done, total, seconds per step (after the first, which includes loading), elapsed and ETA."""
        now = self.ended or time.time()
        done = len(self.history)
        total = int(getattr(self.cfg, "steps", 0) or 0)
        elapsed = now - self.started
        per_step = None
        if done >= 2:
            t = [m.get("time/elapsed") for m in self.history]
            if all(isinstance(x, (int, float)) for x in (t[0], t[-1])) and t[-1] > t[0]:
                per_step = (t[-1] - t[0]) / (done - 1)
            else:
                per_step = (now - (self.first_step_at or self.started)) / (done - 1)
        elif done == 1 and self.first_step_at is not None:
            per_step = self.first_step_at - self.started
        eta = None if per_step is None or self.done else per_step * max(total - done, 0)
        return {
            "step": done,
            "steps": total,
            "elapsed": elapsed,
            "per_step": per_step,
            "eta": eta,
            "phase": self.phase,
            "first_step_after": (self.first_step_at - self.started) if self.first_step_at else None,
        }

    def samples(self) -> list[dict]:
        """The rows of the latest step that logged samples (prompt, completion, rewards...)."""
        if self.record_path is None:
            return []
        from lab.records import load_run

        try:
            rows = load_run(self.record_path).samples
        except FileNotFoundError:
            return []
        if not rows:
            return []
        last = max(int(r.get("step", 0)) for r in rows)
        return [r for r in rows if int(r.get("step", 0)) == last]


def warm_up(task: str | None = "arith") -> None:
    """Import the model libraries and run the default task's model once, ahead of the first run, so a user's
    first Launch does not wait for seconds of imports and first-call set-up. Meant for a background thread at
    server start; any failure here is left for the real run to report."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        from lab.modeling import load_policy
        from lab.sampling import generate

        if task is not None:
            from lab.tasks import get_task

            # One held-out evaluation's worth of sampling and one backward pass: the first call at a batch size
            # sets up kernels and memory (seconds on a busy CPU), later ones reuse them.
            policy = load_policy(task=task, mode="lora")
            t = get_task(task)
            roll = generate(policy.model, policy.tokenizer, t.eval_prompts(), t.max_new_tokens, greedy=True)
            policy.model(input_ids=roll.input_ids, attention_mask=roll.attention_mask).logits.mean().backward()
    except Exception:  # noqa: BLE001
        log.debug("warm-up skipped:\n%s", traceback.format_exc())


def uses_policy(method: str) -> bool:
    """Methods that train a policy (everything but the reward model) take ``policy=`` and get before/after."""
    return method != "rm"


# ----------------------------------------------------------------------------------------------------------------------
# A browser tab's state


@dataclass
class Session:
    """What one tab keeps: its job, the last trained policy and task, the samples shown in the table."""

    job: Job | None = None
    policy: Any = None
    task: Any = None
    samples: list[dict] = field(default_factory=list)
    compared: list[dict] = field(default_factory=list)  # the latest before/after rows

    def close(self) -> None:
        """Stop the tab's run, if any, and drop the policy (called when the tab goes away)."""
        if self.job is not None and not self.job.done:
            self.job.request_stop()
        self.policy = None
        self.job = None


def resolve_task(task_name: str):
    """The built-in Task for a name, or None for a data source (jsonl:PATH, hf:ID, a path)."""
    from lab.tasks import TASKS

    return TASKS.get(task_name)


def config_for(cls: type, values: dict[str, Any]):
    """The run's config from the form's values. With ``resume``, the resumed run's own settings, changed only where
    the form may change them (``RESUME_MAY_CHANGE``: steps, device, logging...): the other widgets still show this
    method's defaults, which are not the run's settings."""
    from lab.config import RESUME_MAY_CHANGE

    if not values.get("resume"):
        return cls(**values)
    changes = {k: v for k, v in values.items() if k in RESUME_MAY_CHANGE and v is not None}
    return cls.resuming(values["resume"], out=values.get("out") or "runs", **changes)


def start(session: Session, method: str, values: dict[str, Any]) -> Job:
    """Validate ``values`` into ``method``'s config and start the run in a thread.

    Raises right away (in the caller's thread) for a bad value (ConfigError), bad or unreachable data (DataError),
    or user data without a model; a model that cannot be found shows up as ``job.error`` once loading fails.
    """
    from lab.config import ConfigError
    from lab.methods import get_method

    cls, train_fn = get_method(method)
    cfg = config_for(cls, coerce(cls, values))
    task = resolve_task(cfg.task)
    if task is None:
        from lab.data import load_rows

        load_rows(cfg.task)  # bad rows or an unreachable dataset fail now, with the row and key named
        if not cfg.model:
            raise ConfigError("model: your own data needs a model (a built-in name, a local folder or a hub id)")
    from lab.records import check_run_target

    if not getattr(cfg, "resume", None):  # a resumed run writes on in its own folder (checked by the config)
        check_run_target(cfg.out, cfg.run_id)  # a bad or taken run id fails now, before any loading
    if session.job is not None and not session.job.done:
        raise RuntimeError("this tab already has a run going; stop it first")
    session.policy = None  # free the previous policy before loading the next one
    session.job = Job(method=method, cfg=cfg, train_fn=train_fn, task=task)
    session.task = task
    session.samples = []
    session.compared = []
    return session.job.start()


def finish(session: Session) -> None:
    """After a run: keep its policy in the session for before/after and the per-token view."""
    job = session.job
    if job is not None and job.done and job.policy is not None and job.phase in ("completed", "stopped"):
        session.policy = job.policy
        session.task = job.task
        if job.method == "csft" and job.task is not None:  # conditional SFT answers after its `good` control
            from lab.csft import ControlledTask

            session.task = ControlledTask(job.task, job.policy.tokenizer, job.cfg.good)


# ----------------------------------------------------------------------------------------------------------------------
# Before / after and the per-token view


def compare(session: Session, n: int | None = 8, prompts: list[str] | None = None) -> tuple[list[dict], dict]:
    """The same held-out prompts answered greedily by π_ref (adapters off) and by the tuned policy. ``n``: how many
    (more than the task holds is refused); None: up to 8.

    Returns (rows, summary): rows have prompt, before, before_reward, after, after_reward; summary has the mean
    reward before and after and their difference (None when there is no gold reward, e.g. for your own data).
    """
    policy, task = session.policy, session.task
    if policy is None:
        raise ValueError("no trained policy in this tab yet: launch a run first")
    if task is not None:
        from lab.evaluate import before_after

        count = len(task.eval_prompts())
        if prompts is None and n is None:
            n = min(8, count)
        elif prompts is None:  # a task has so many held-out prompts: more is refused, not cut down without a word
            n = check_count("held-out prompts", n, 1, count, f" ({task.name} has that many)")
        rows = before_after(policy, task, prompts=prompts, n=n)
    else:
        n = 8 if n is None else check_count("held-out prompts", n, 1, 100_000)
        rows = _before_after_untasked(policy, session, n, prompts)
    session.compared = rows
    before = [r["before_reward"] for r in rows if r["before_reward"] is not None]
    after = [r["after_reward"] for r in rows if r["after_reward"] is not None]
    summary = {"n": len(rows), "before": None, "after": None, "diff": None}
    if before and after:
        summary["before"] = sum(before) / len(before)
        summary["after"] = sum(after) / len(after)
        summary["diff"] = summary["after"] - summary["before"]
    return rows, summary


def reliability(session: Session, n: int | None = None) -> dict[str, list[dict]]:
    """The reliability diagram of π_ref (adapters off) and of the tuned policy on the first ``n`` (None: 64)
    held-out prompts of a task with checkable answers: {"before": bins, "after": bins}, each
    ``lab.diagnostics.reliability_bins`` of the greedy answer's probability against its correctness."""
    from lab.diagnostics import answer_confidences, reliability_bins

    policy, task = session.policy, session.task
    if policy is None:
        raise ValueError("no trained policy in this tab yet: launch a run first")
    if task is None or task.kind != "verifiable":
        raise ValueError("a reliability diagram needs answers that can be checked: train on arith (or math rows)")
    count = len(task.eval_prompts())
    n = 64 if n is None else check_count("held-out prompts", n, 1, count, f" ({task.name} has that many)")
    prompts = task.eval_prompts()[:n]
    was_training = policy.model.training
    policy.model.eval()
    try:
        after = reliability_bins(*answer_confidences(policy.model, policy.tokenizer, task, prompts))
        with policy.reference() as ref:
            before = reliability_bins(*answer_confidences(ref, policy.tokenizer, task, prompts))
    finally:
        policy.model.train(was_training)
    return {"before": before, "after": after}


def _before_after_untasked(policy, session: Session, n: int, prompts: list | None) -> list[dict]:
    """Before/after on the user's own prompts (text or chat messages). They are scored when the run's reward can
    score without a task (math, a reward model, python:module:function), with the rows' extra columns."""
    from lab.data import prompt_columns
    from lab.evaluate import evaluate_prompts
    from lab.rollout import resolve_max_new_tokens

    cfg = session.job.cfg if session.job is not None else None
    rows: list[dict] = [{"prompt": p} for p in prompts] if prompts else []
    if not rows and cfg is not None:
        from lab.data import load_rows

        seen, rows = set(), []
        for row in load_rows(cfg.task, format="prompt_only"):  # the first n distinct prompts, with their columns
            key = repr(row["prompt"])
            if key not in seen:
                seen.add(key)
                rows.append(dict(row))
            if len(rows) == n:
                break
    if not rows:
        raise ValueError("no prompts to compare on: launch a run on your data first")
    reward_fn = _reward_without_task(cfg)
    columns = prompt_columns(rows)
    texts = [r["prompt"] for r in rows]
    max_new = resolve_max_new_tokens(cfg) if cfg is not None else 64
    with policy.reference() as ref:
        before = evaluate_prompts(_as_policy(ref, policy), texts, reward_fn, columns, max_new_tokens=max_new)["rows"]
    after = evaluate_prompts(policy, texts, reward_fn, columns, max_new_tokens=max_new)["rows"]
    return [
        {
            "prompt": _display(p),
            "before": b["completion"],
            "before_reward": b.get("reward"),
            "after": a["completion"],
            "after_reward": a.get("reward"),
        }
        for p, b, a in zip(texts, before, after)
    ]


def _as_policy(model, policy):
    """A model (π_ref inside ``policy.reference()``) with the policy's tokenizer, shaped like a policy."""
    from types import SimpleNamespace

    return SimpleNamespace(model=model, tokenizer=policy.tokenizer, device=policy.device)


def _reward_without_task(cfg):
    """The run's reward, when it scores without a built-in task; None for 'gold' or anything that fails to load."""
    spec = getattr(cfg, "reward", None)
    if not spec or spec == "gold":
        return None
    from lab.rewards import make_reward

    try:
        return make_reward(spec)
    except Exception:  # noqa: BLE001 - before/after still shows the completions without a reward
        return None


def _display(prompt) -> str:
    """A prompt as the table shows it: chat messages as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@torch.no_grad()
def token_kl(policy, prompt, completion: str, add_eos: bool = True) -> list[dict]:
    """Per completion token: log π_θ, log π_ref and their difference (the k1 KL term of that token).

        kl_t = log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)

    Summed over t this is log π_θ(y|x) − log π_ref(y|x), the single-sample KL estimate of the sequence.
    Scored at temperature 1, prompt and completion tokenized as the trainers do (``encode_pairs``).
    """
    from lab.batching import encode_pairs
    from lab.ops import completion_token_logprobs

    tok = policy.tokenizer
    batch = encode_pairs(tok, [prompt], [completion], add_eos=add_eos).to(policy.device)
    T = int(batch.completion_mask.sum())  # completion tokens (+ eos)
    ids = batch.input_ids  # (1, P+T), one row: no padding
    was_training = policy.model.training
    policy.model.eval()
    try:
        logprobs = completion_token_logprobs(policy.model, ids, batch.attention_mask, T)[0]  # (T,)
        with policy.reference() as ref:
            ref_logprobs = completion_token_logprobs(ref, ids, batch.attention_mask, T)[0]  # (T,)
    finally:
        policy.model.train(was_training)
    completion_ids = ids[0, -T:].tolist()
    out = []
    for i, token_id in enumerate(completion_ids):
        text = "</s>" if token_id == tok.eos_token_id else tok.decode([token_id])
        lp, rlp = float(logprobs[i]), float(ref_logprobs[i])
        out.append({"token": text, "logprob": lp, "ref_logprob": rlp, "kl": lp - rlp})
    return out


def has_best_of_n() -> bool:
    try:
        from lab.baselines import best_of_n  # noqa: F401
    except ImportError:
        return False
    return True


def reward_models(out: str) -> list[str]:
    """Folders of finished reward-model runs under ``out`` (what best-of-N and PPO can score with)."""
    return [str(Path(out) / r["id"]) for r in past_runs(out) if r["method"] == "rm" and r["status"] == "completed"]


def reward_model_choices(out: str) -> list[tuple[str, str]]:
    """(label, folder) for each finished reward model under ``out``; the label names the task it was trained on."""
    return [(f"{Path(path).name} · task {reward_model_task(path) or '?'}", path) for path in reward_models(out)]


def reward_model_task(path: str) -> str | None:
    """The task a reward-model run was trained on (its recorded config), or None for anything else."""
    from lab.records import load_run

    try:
        return (load_run(Path(path)).config or {}).get("task")
    except Exception:  # noqa: BLE001 - not a run folder: a checkpoint path or a hub model
        return None


def best_of_n(
    session: Session,
    task_name: str,
    reward: str = "gold",
    n: int = 8,
    prompts: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """Best-of-N from π_ref on held-out prompts of a built-in task, scored by ``reward`` ("gold" or a reward-model
    run folder). π_ref is the tab's policy with its adapters off when it has one on this task, else the task's
    base model. Returns (rows, summary) with the gold reward of the pick, of a single sample, and the KL bound."""
    from types import SimpleNamespace

    from lab.baselines import best_of_n as bon
    from lab.baselines import kl_bound
    from lab.rewards import make_reward
    from lab.tasks import get_task

    task = get_task(task_name)
    trained_on = reward_model_task(reward) if reward != "gold" else None
    if trained_on is not None and trained_on != task_name:
        from lab.config import ConfigError

        raise ConfigError(
            f"reward: the reward model {Path(reward).name} was trained on {trained_on}, not "
            f"{task_name}; pick one trained on {task_name} or gold"
        )
    n = check_count("N", n, 1, 4096)
    prompts = check_count("held-out prompts", prompts, 1, len(task.eval_prompts()), f" ({task_name} has that many)")
    scorer = make_reward(reward, task)
    held_out = task.eval_prompts()[:prompts]
    kwargs = dict(max_new_tokens=task.max_new_tokens, temperature=temperature, seed=seed, task=task)
    policy = session.policy if session.policy is not None and session.task is task else None
    if policy is not None and policy.has_adapters:
        with policy.reference() as ref:
            rows = bon(SimpleNamespace(model=ref, tokenizer=policy.tokenizer), scorer, held_out, n, **kwargs)
    else:
        from lab.modeling import load_policy

        base = load_policy(task.model, task=task_name, mode="lora")  # adapters start at zero: this is π_ref
        rows = bon(base, scorer, held_out, n, **kwargs)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    summary = {
        "n": n,
        "prompts": len(rows),
        "best_gold": mean("gold_reward"),
        "sample_gold": mean("mean_gold_reward"),
        "kl_bound": kl_bound(n),
    }
    return rows, summary


# ----------------------------------------------------------------------------------------------------------------------
# Past runs


HIGHLIGHT_FIELDS = (
    "beta",
    "lr",
    "group_size",
    "epsilon_low",
    "epsilon_high",
    "cliprange",
    "temperature",
    "lora_r",
    "mode",
)


def run_label(run) -> str:
    """Short name for a run in a legend: method, task, the hyperparameters that usually differ, and the id."""
    cfg = run.config or {}
    parts = [str(run.method or "?"), str(cfg.get("task", "?"))]
    for key in ("beta", "lr", "group_size"):
        if key in cfg and cfg[key] is not None:
            parts.append(
                f"{'β' if key == 'beta' else key}={cfg[key]:g}"
                if isinstance(cfg[key], (int, float))
                else f"{key}={cfg[key]}"
            )
    return f"{' '.join(parts)} · {run.run_id}"


FINAL_REWARD = ("reward/mean", "eval/exact_reward", "eval/sample_reward", "eval/gold_reward", "eval/accuracy")
FINAL_GOLD = ("reward/gold", "eval/gold_reward", "eval/accuracy", "eval/exact_reward")


def last_value(metrics: list[dict], keys: tuple[str, ...]) -> float | None:
    """The last logged value of the first of ``keys`` that the run logged."""
    for key in keys:
        values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
        if values:
            return values[-1]
    return None


def past_runs(out: str) -> list[dict]:
    """One row per run under ``out``, newest first: id, label, method, task, status, steps, the final reward, gold
    reward and KL to π_ref, and key settings."""
    from lab.records import list_runs

    rows = []
    for run in list_runs(out):
        row = run.summary_row()
        cfg = run.config or {}
        rows.append(
            {
                "id": run.run_id,
                "label": run_label(run),
                "method": row.get("method"),
                "task": row.get("task"),
                "status": row.get("status"),
                "steps": row.get("steps"),
                "started": row.get("started"),
                "reward": last_value(run.metrics, FINAL_REWARD),
                "gold": last_value(run.metrics, FINAL_GOLD),
                "kl/ref": last_value(run.metrics, ("kl/ref",)),
                **{k: cfg.get(k) for k in HIGHLIGHT_FIELDS if k in cfg},
            }
        )
    return rows[::-1]


def load_runs(out: str, run_ids: list[str]) -> dict[str, Any]:
    """label → RunData, for comparing runs."""
    from lab.records import load_run, safe_run_dir

    runs = {}
    for run_id in run_ids:
        run = load_run(safe_run_dir(out, run_id))
        runs[run_label(run)] = run
    return runs


def config_diff(runs: dict[str, Any]) -> list[dict]:
    """The settings that differ between runs: one row per setting, one column per run."""
    configs = {label: run.config or {} for label, run in runs.items()}
    keys = sorted({k for c in configs.values() for k in c if k not in ("meta", "out", "run_id")})
    rows = []
    for key in keys:
        values = [configs[label].get(key) for label in configs]
        if len({repr(v) for v in values}) > 1:
            rows.append({"setting": key, **{label: _cell(v) for label, v in zip(configs, values)}})
    return rows


def _cell(value) -> str:
    return "–" if value is None else str(value)


def answers_side_by_side(runs: dict[str, Any], n: int = 8) -> list[dict]:
    """Each run's answers to the same prompts: its before/after table where the app saved one, else its last
    logged samples. One row per prompt (those of the first run), one column per run (and π_ref's answer)."""
    answers: dict[str, dict[str, str]] = {}
    reference: dict[str, str] = {}
    for label, run in runs.items():
        saved = load_before_after(run.path)
        if saved:
            answers[label] = {_key(r["prompt"]): r["after"] for r in saved}
            reference.update({_key(r["prompt"]): r["before"] for r in saved})
            continue
        last = max((int(r.get("step", 0)) for r in run.samples), default=None)
        rows = [r for r in run.samples if int(r.get("step", 0)) == last]
        answers[label] = {}
        for r in rows:
            answers[label].setdefault(_key(r.get("prompt")), str(r.get("completion")))
    prompts = list(next(iter(answers.values()), {}))[:n]
    return [
        {
            "prompt": p,
            **({"π_ref": reference[p]} if p in reference else {}),
            **{k: a.get(p, "–") for k, a in answers.items()},
        }
        for p in prompts
    ]


def _key(prompt) -> str:
    return prompt if isinstance(prompt, str) else _display(prompt or [])


BEFORE_AFTER_FILE = "before_after.json"


def save_before_after(path: Path | None, rows: list[dict]) -> None:
    """Keep the app's before/after rows with the run, for comparing runs later (best effort: a full disk or a
    deleted folder only loses this file)."""
    import json

    if path is None or not Path(path).is_dir():
        return
    try:
        (Path(path) / BEFORE_AFTER_FILE).write_text(json.dumps(rows, default=str), encoding="utf-8")
    except OSError:
        log.warning("could not save %s in %s", BEFORE_AFTER_FILE, path)


def load_before_after(path: Path) -> list[dict]:
    import json

    try:
        rows = json.loads((Path(path) / BEFORE_AFTER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def delete_runs(out: str, run_ids: list[str]) -> list[str]:
    """Delete run folders under ``out``; a run still going is refused (RunTargetError), and nothing is deleted."""
    from lab.records import RunTargetError, load_run, safe_run_dir

    paths = [safe_run_dir(out, run_id) for run_id in run_ids]
    for path in paths:
        run = load_run(path)
        if (run.status or {}).get("status") == "running" and not run.interrupted:
            raise RunTargetError(f"run {path.name}: still running; stop it before deleting it")
    for path in paths:
        shutil.rmtree(path)
    return [p.name for p in paths]


def can_resume() -> bool:
    """Whether the configs take ``resume`` (a run to continue), so that the app can offer it."""
    from lab.config import BaseConfig

    return "resume" in {f.name for f in dataclasses.fields(BaseConfig)}


def resumable(out: str, run_id: str) -> str:
    """The method of a run that can be resumed (stopped or interrupted), else a one-line RunTargetError."""
    from lab.records import RunTargetError, load_run, safe_run_dir

    run = load_run(safe_run_dir(out, run_id))
    status = run.summary_row()["status"]
    if status not in ("stopped", "interrupted"):
        raise RunTargetError(f"run {run_id}: {status}; only a stopped or interrupted run can be resumed")
    if not run.method:
        raise RunTargetError(f"run {run_id}: its config names no method")
    return run.method


# ----------------------------------------------------------------------------------------------------------------------
# The step inspector's data


def inspect_target(out: str, run_id: str | None, session: Session | None) -> Path:
    """The run folder to inspect: ``run_id`` under ``out``, else the tab's latest run."""
    from lab.records import RunNotFound, safe_run_dir

    if run_id and str(run_id).strip():
        return safe_run_dir(out, str(run_id).strip())
    job = session.job if session is not None else None
    if job is None or job.record_path is None:
        raise RunNotFound("run id: no run in this tab yet; launch one or give a run id")
    return Path(job.record_path)


def inspect_step(path: Path, step=None) -> dict:
    """One logged step of a run, ready for the inspector: its rows, per-token terms and the run's config."""
    from lab import inspector
    from lab.config import ConfigError
    from lab.records import load_run

    run = load_run(path)
    steps = inspector.logged_steps(run.samples)
    if not steps:
        raise ConfigError(f"step: run {run.run_id} logged no samples (a reward-model run has none)")
    if step is None or (isinstance(step, str) and not step.strip()):
        chosen = steps[-1]
    else:
        chosen = check_count("step", step, 1, 10**9)
        if chosen not in steps:
            shown = ", ".join(map(str, steps[-8:]))
            raise ConfigError(f"step: run {run.run_id} logged samples at steps {shown} (latest), not {chosen}")
    rows = inspector.step_rows(run.samples, chosen)
    config = run.config or {}
    return {
        "run": run.run_id,
        "step": chosen,
        "config": config,
        "rows": rows,
        "terms": [inspector.token_terms(r, config) for r in rows],
    }
