"""Run records: everything a run leaves on disk, and reading it back.

    <out>/<run_id>/
        config.json         the full config, plus "meta": lab version, time, host, pid, command line
        status.json         {"status", "started", "ended", "steps", "pid", "host", "latest_checkpoint",
                             "checkpoints", "error"?, "summary"?}
        metrics.jsonl       one JSON object per logged step: {"step": 3, "loss/policy": 0.41, ...}
        samples.jsonl       {"step", "prompt", "completion", "reward/...": ...} rows every few steps
        checkpoints/<tag>/  save_pretrained() output, plus the tokenizer, and what a resumed run needs:
                            trainer_state.pt (the trained tensors, the optimizer, the random states, the
                            position in the data) and trainer_state.json ({"step": k})

status is one of "running", "completed", "stopped" (Ctrl-C, a stop request, a closed trainer
generator) or "failed" (an exception; "error" holds its one-line text).

Why the files are written the way they are:
- metrics and samples lines are appended, flushed and fsync'd as they come, so a run killed at any
  moment (Ctrl-C, out of memory, SIGKILL) keeps every finished line; at worst the last line is
  torn, and `load_run` skips it.
- status.json is replaced atomically (write a temp file, then os.replace), so a reader never sees
  half a status. A killed run's status stays "running"; `RunData.interrupted` tells it apart from a
  live run by checking whether the recorded pid is still alive.
- JSON has no NaN or Infinity. A non-finite metric is written as null, so the files stay strict JSON
  that any parser reads, and a warning names the metric the first time it happens, so a diverging
  loss is not hidden.

A run is resumed (``--resume``, see `find_resume_point` and `RunRecord.reopen`) from its newest checkpoint
that holds a trainer state: the same folder goes on, metrics and samples logged after that checkpoint's
step (by a run killed later) are dropped, and status.json's "resumed" lists the steps it went on from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lab.errors import ConfigError, UserError

STATUSES = ("running", "completed", "stopped", "failed")
TRAINER_STATE = "trainer_state.pt"  # in a checkpoint folder: what resuming needs besides the weights
FINAL_STATUSES = ("completed", "stopped", "failed")

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")

# errno values that mean the disk (or the user's quota on it) is full
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class RunTargetError(UserError, ValueError):
    """A run id or an output folder that cannot hold a run: a path in the id, an existing run, --out a file."""


class RunNotFound(UserError, FileNotFoundError):
    """No run folder where one was asked for."""


class ResumeError(ConfigError):
    """A run that cannot be resumed: unknown, without a checkpoint to go on from, still running, or trained with
    other settings."""


class DiskFull(UserError, OSError):
    """No space left on the device while writing a record. The record keeps every line written before."""


def safe_run_dir(out: str | os.PathLike, run_id: str) -> Path:
    """`<out>/<run_id>`, after checking that run_id is a plain folder name that stays inside `out`.

    Run ids come from the command line and the app, so one like "../../etc" or "/abs" must not
    write outside the runs folder. Allowed: letters, digits, '.', '_', '-', not starting with '.'
    (which also rules out '.' and '..').
    """
    _check_name(run_id, "run id")
    return Path(out) / run_id


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise RunTargetError(f"{what} must be a non-empty string, got {name!r}")
    if not _SAFE_NAME.fullmatch(name):
        raise RunTargetError(
            f"{what} {name!r} may only use letters, digits, '.', '_' and '-' (no path separators or spaces)"
        )
    if name.startswith("."):
        raise RunTargetError(f"{what} {name!r} must not start with '.'")


def check_run_target(out: str | os.PathLike, run_id: str | None = None) -> Path:
    """Check, without creating anything, that a run can be recorded in `<out>/<run_id>`: the id is a plain name
    (see `safe_run_dir`) not taken yet, and `out` is a writable folder or can be made one. Returns `out` as a Path.

    The CLI calls it before the model loads, so a typo costs no loading time and leaves no folder behind;
    `RunRecord.create` calls it again. Raises RunTargetError (a UserError) naming the problem.
    """
    out = Path(out)
    if run_id is not None:
        path = safe_run_dir(out, run_id)
        if path.exists() or path.is_symlink():
            raise RunTargetError(f"run folder {path} already exists; choose another run id")
    # the nearest folder that exists is the one that must let us write: out itself, or where out will be made
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise RunTargetError(f"--out {out}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is inside {existing}, which is a file"
        raise RunTargetError(f"--out {out} {where}, not a folder; choose a folder for the run records")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunTargetError(f"--out {out}: cannot write to {existing} (permission denied); choose a folder you own")
    return out


class RunRecord:
    """Writes one run's folder. Make one with `RunRecord.create(...)`.

    As a context manager it finishes the run on exit: "completed" on a normal exit, "stopped" on
    KeyboardInterrupt or a closed generator, "failed" (with the error's one-line text) on any other
    exception, which is re-raised. A run already finished inside the block is left as it is.
    """

    def __init__(self, path: Path, status: dict):
        self.path = Path(path)
        self.run_id = self.path.name
        self._status = status
        self._steps = 0  # metrics rows logged
        self._warned_nonfinite: set[str] = set()
        self._trackers: list = []  # lab.trackers: each gets every metrics row after metrics.jsonl has it
        self.last_metrics: dict = {}  # the last row logged (of a resumed run: the last row it kept)

    @classmethod
    def create(
        cls,
        out: str | os.PathLike = "runs",
        run_id: str | None = None,
        config: dict | Any = None,
        *,
        prefix: str | None = None,
    ) -> RunRecord:
        """Create `<out>/<run_id>/` with config.json and a "running" status.json.

        run_id None -> "<prefix>-YYYYmmdd-HHMMSS-<4 hex>", where prefix defaults to the config's
        "method" (or its class name without "Config": GRPOConfig -> "grpo"), else "run".
        `config` is a dict or a dataclass instance. An existing run folder is never reused.
        """
        config_dict = _config_dict(config)
        method = prefix or config_dict.get("method") or _method_from_class(config)
        out = check_run_target(out, run_id)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a race with the check above, or a read-only file system that os.access missed
            raise RunTargetError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None

        for _ in range(10):  # only generated ids retry; a collision needs the same second and 4 hex
            rid = run_id
            if rid is None:
                rid = f"{_slug(method or 'run')}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
            path = safe_run_dir(out, rid)
            try:
                path.mkdir()
                break
            except FileExistsError:
                if run_id is not None:
                    raise RunTargetError(f"run folder {path} already exists; choose another run id") from None
            except OSError as err:
                raise RunTargetError(f"--out {out}: cannot create {path} ({err.strerror or err})") from None
        else:
            raise RuntimeError(f"could not find a free run id in {out}")

        started = _now()
        meta = {
            "lab_version": _lab_version(),
            "created": started,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "argv": list(sys.argv),
            "method": method,
            # versions of the libraries that shape results, if this process uses them
            **{
                f"{name}_version": getattr(sys.modules[name], "__version__", None)
                for name in ("torch", "transformers", "peft")
                if name in sys.modules
            },
        }
        if config is not None and not isinstance(config, dict):
            meta["config_class"] = type(config).__name__
        status = {
            "status": "running",
            "run_id": rid,
            "started": started,
            "ended": None,
            "steps": 0,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "latest_checkpoint": None,
            "checkpoints": [],
        }
        try:
            _write_json_atomic(path / "config.json", {**config_dict, "meta": meta})
            _write_json_atomic(path / "status.json", status)
        except BaseException:
            # a run that never started leaves no folder: a full disk or Ctrl-C here would leave a run without status
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, status)

    @classmethod
    def reopen(cls, path: str | os.PathLike, step: int, config: dict | Any = None) -> RunRecord:
        """Go on writing the run in `path` from its checkpoint at `step` (see `find_resume_point`).

        Metrics and samples rows after `step` are dropped (a run killed after its checkpoint logged them), each file
        rewritten atomically; config.json gets `config` (a resumed run may change its step count and how often it
        logs) with its "meta" kept, and status.json says "running" again, for this process, with
        ``"resumed": [..., {"from_step": step, "at": time}]``.
        """
        path = Path(path)
        status = _read_json(path / "status.json") or {}
        kept = _keep_rows_until(path / "metrics.jsonl", step)
        _keep_rows_until(path / "samples.jsonl", step)
        old_config = _read_json(path / "config.json") or {}
        meta = dict(old_config.get("meta") or {})
        now = _now()
        meta["resumed"] = [*meta.get("resumed", []), {"from_step": int(step), "at": now, "argv": list(sys.argv)}]
        config_dict = _config_dict(config) if config is not None else {k: v for k, v in old_config.items()}
        _write_json_atomic(path / "config.json", {**config_dict, "meta": meta})
        for key in ("error", "summary"):
            status.pop(key, None)
        status.update(
            status="running",
            run_id=path.name,
            ended=None,
            steps=len(kept),
            pid=os.getpid(),
            host=socket.gethostname(),
            resumed=[*status.get("resumed", []), {"from_step": int(step), "at": now}],
        )
        status.setdefault("started", meta.get("created", now))
        status.setdefault("checkpoints", [])
        status.setdefault("latest_checkpoint", None)
        _write_json_atomic(path / "status.json", status)
        record = cls(path, status)
        record._steps = len(kept)
        record.last_metrics = kept[-1] if kept else {}
        return record

    # ---- state ---------------------------------------------------------------------------------

    @property
    def status(self) -> dict:
        """A copy of what status.json holds now."""
        return dict(self._status)

    @property
    def finished(self) -> bool:
        return self._status["status"] != "running"

    @property
    def steps(self) -> int:
        """How many metrics rows were logged."""
        return self._steps

    # ---- writing -------------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: dict) -> dict:
        """Append {"step": step, **metrics} to metrics.jsonl and return the row as written.

        Tensors and numpy scalars become Python numbers; non-finite floats become null (see the
        module docstring). A "step" key inside `metrics` is replaced by the `step` argument.
        """
        self._check_running()
        nonfinite: dict[str, float] = {}
        row = {"step": int(step)}
        for key, value in metrics.items():
            if key != "step":
                row[key] = _jsonable(value, key, strict=True, on_nonfinite=nonfinite.setdefault)
        _append_jsonl(self.path / "metrics.jsonl", [row])
        self._steps += 1
        self.last_metrics = row
        if self._trackers:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._report({**numbers, **nonfinite}, step)
        for key, value in nonfinite.items():
            if key not in self._warned_nonfinite:  # once per metric: a NaN loss stays NaN
                self._warned_nonfinite.add(key)
                message = f"metric {key!r} is {value} at step {step}; written as null in metrics.jsonl"
                warnings.warn(message, stacklevel=2)
        return row

    def add_tracker(self, tracker: Any) -> None:
        """Send every metrics row logged from now on to `tracker` too (``log(metrics, step)``, ``close()``; see
        lab.trackers), after metrics.jsonl has it: the file stays the record. `finish` closes it."""
        self._trackers.append(tracker)

    def _report(self, metrics: dict, step: int) -> None:
        """A tracker that fails mid-run (a lost connection) is dropped with one warning; the run goes on."""
        for tracker in list(self._trackers):
            try:
                tracker.log({k: v for k, v in metrics.items() if k != "step"}, int(step))
            except Exception as err:  # noqa: BLE001 - metrics.jsonl has the row; training goes on
                self._trackers.remove(tracker)
                warnings.warn(f"stopped reporting to {tracker!r}: {_one_line(err)}", stacklevel=3)

    def _close_trackers(self) -> None:
        for tracker in self._trackers:
            try:
                tracker.close()
            except Exception as err:  # noqa: BLE001 - the run's own record is complete
                warnings.warn(f"closing {tracker!r} failed: {_one_line(err)}", stacklevel=3)
        self._trackers = []

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Append one {"step": step, **row} line per row (prompt, completion, rewards...) to samples.jsonl."""
        self._check_running()
        lines = [{"step": int(step), **_jsonable(dict(row), "sample", strict=True)} for row in rows]
        _append_jsonl(self.path / "samples.jsonl", lines)

    def save_checkpoint(self, obj: Any, tag: str, tokenizer: Any = None, state: dict | None = None) -> Path:
        """Save `obj` to `<run>/checkpoints/<tag>/` and record `tag` as the latest checkpoint.

        `obj` needs `save_pretrained(dir)` (a transformers/peft model) or `save(dir)` (lab's Policy).
        The tokenizer (the argument, else `obj.tokenizer`) is saved next to it. `state`, a trainer's state
        with its "step" (lab.runner), goes to trainer_state.pt, and {"step"} to trainer_state.json. The checkpoint is
        written to a temporary folder and renamed into place, so a run killed while saving never
        leaves a half-written checkpoint under the tag; saving the same tag again replaces it.
        """
        _check_name(tag, "checkpoint tag")
        root = self.path / "checkpoints"
        root.mkdir(exist_ok=True)
        final, tmp, old = root / tag, root / f".{tag}.tmp", root / f".{tag}.old"
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)

        if hasattr(obj, "save_pretrained"):
            obj.save_pretrained(str(tmp))
        elif hasattr(obj, "save"):
            obj.save(str(tmp))
        else:
            raise TypeError(f"cannot save a {type(obj).__name__}: it has neither save_pretrained() nor save()")
        tokenizer = tokenizer if tokenizer is not None else getattr(obj, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        if state is not None:
            import torch

            with _disk_full_is_user_error(tmp / TRAINER_STATE):
                torch.save(state, tmp / TRAINER_STATE)
            _write_json_atomic(tmp / "trainer_state.json", {"step": int(state["step"])})

        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)

        self._status["latest_checkpoint"] = tag
        if tag not in self._status["checkpoints"]:
            self._status["checkpoints"].append(tag)
        self._status["steps"] = self._steps
        _write_json_atomic(self.path / "status.json", self._status)
        return final

    def finish(self, status: str, summary: dict | None = None, error: BaseException | str | None = None) -> None:
        """Write the final status.json: "completed", "stopped" or "failed" (with `error`'s first line)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"finish status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        if self.finished:
            raise RuntimeError(f"run {self.run_id} already finished as {self._status['status']!r}")
        self._status.update(status=status, ended=_now(), steps=self._steps)
        if error is not None:
            self._status["error"] = _one_line(error)
        if summary is not None:
            self._status["summary"] = _jsonable(summary, "summary", strict=False)
        _write_json_atomic(self.path / "status.json", self._status)
        self._close_trackers()

    def discard(self) -> None:
        """Remove the folder of a run that never started (no metrics, no checkpoint), as if it had not been made:
        a trainer that fails while loading leaves no run behind."""
        if self._steps or self._status["checkpoints"]:
            raise RuntimeError(f"run {self.run_id} has a record to keep; finish it instead")
        self._close_trackers()
        shutil.rmtree(self.path, ignore_errors=True)
        self._status["status"] = "stopped"  # nothing more can be written to it

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.finished:
            if exc_type is None:
                self.finish("completed")
            elif issubclass(exc_type, (KeyboardInterrupt, GeneratorExit)):
                self.finish("stopped")
            else:
                self.finish("failed", error=exc)
        return False  # never swallow the exception

    def __repr__(self) -> str:
        return f"RunRecord({str(self.path)!r}, status={self._status['status']!r})"

    def _check_running(self) -> None:
        if self.finished:
            raise RuntimeError(f"run {self.run_id} is already finished; nothing more can be logged")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What `load_run` reads back from a run folder."""

    run_id: str
    path: Path
    config: dict
    metrics: list[dict]
    samples: list[dict]
    status: dict | None  # None if status.json is missing or unreadable
    bad_lines: int = 0  # corrupt lines skipped inside metrics/samples (a torn last line is not counted)

    @property
    def interrupted(self) -> bool:
        """True if status.json says "running" but the process that wrote it is gone (killed, crashed).

        Only checkable on the host that ran it; a run from another host is never called interrupted.
        """
        status = self.status or {}
        if status.get("status") != "running" or not isinstance(status.get("pid"), int):
            return False
        if status.get("host") not in (None, socket.gethostname()):
            return False
        return not _pid_alive(status["pid"])

    @property
    def method(self) -> str | None:
        return self.config.get("method") or self.config.get("meta", {}).get("method")

    @property
    def task(self) -> str | None:
        return self.config.get("task")

    @property
    def started(self) -> str | None:
        return (self.status or {}).get("started") or self.config.get("meta", {}).get("created")

    @property
    def steps(self) -> int:
        """Steps logged: status.json's count, or the metrics rows read, whichever is larger (a killed run's
        status.json still says 0)."""
        return max(int((self.status or {}).get("steps") or 0), len(self.metrics))

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the newest checkpoint a resumed run can go on from (one with a trainer state), or None."""
        steps = checkpoint_steps(self.path)
        return max(steps.values()) if steps else None

    @property
    def resumable(self) -> bool:
        """Stopped, interrupted or failed, with a checkpoint to go on from and steps left: ``--resume`` continues it."""
        status = "interrupted" if self.interrupted else (self.status or {}).get("status")
        step = self.checkpoint_step
        steps = self.config.get("steps")
        left = isinstance(steps, int) and step is not None and step < steps
        return status in ("stopped", "interrupted", "failed") and left

    def summary_row(self) -> dict:
        """One row of the `runs` listing: id, method, task, status, steps, started, last metrics, and whether
        ``--resume`` can continue it (``resumable``, from the checkpoint at ``checkpoint_step``).

        Its status is "interrupted" for a run that `interrupted` says is dead, so a listing does not
        show killed runs as running ("status" in the RunData itself keeps what the file says).
        """
        status = "interrupted" if self.interrupted else (self.status or {}).get("status", "unknown")
        last = self.metrics[-1] if self.metrics else {}
        return {
            "id": self.run_id,
            "method": self.method,
            "task": self.task,
            "status": status,
            "steps": self.steps,
            "started": self.started,
            "metrics": {key: value for key, value in last.items() if key != "step"},
            "resumable": self.resumable,
            "checkpoint_step": self.checkpoint_step,
        }


def load_run(path: str | os.PathLike) -> RunData:
    """Read a run folder. Missing files read as empty; a torn last line of a .jsonl file is skipped
    silently, corrupt lines before it are skipped and counted in `bad_lines`. A symbolic link is refused: a run
    folder is one a run wrote, and a link could point a listing or the app anywhere on the disk."""
    path = Path(path)
    if path.is_symlink():
        raise RunNotFound(f"{path} is a symbolic link, not a run folder; run records are read from real folders only")
    if not path.is_dir():
        raise RunNotFound(f"no run folder at {path}")
    metrics, bad_metrics = _read_jsonl_tolerant(path / "metrics.jsonl")
    samples, bad_samples = _read_jsonl_tolerant(path / "samples.jsonl")
    return RunData(
        run_id=path.name,
        path=path,
        config=_read_json(path / "config.json") or {},
        metrics=metrics,
        samples=samples,
        status=_read_json(path / "status.json"),
        bad_lines=bad_metrics + bad_samples,
    )


def list_runs(out: str | os.PathLike = "runs") -> list[RunData]:
    """Every run folder under `out` (one holding config.json or status.json), oldest first. Symbolic links are
    skipped, with one warning naming them (see `load_run`)."""
    root = Path(out)
    if not root.is_dir():
        return []
    children = sorted(root.iterdir())
    links = [child.name for child in children if child.is_symlink()]
    if links:
        warnings.warn(
            f"skipped {len(links)} symbolic link(s) in {root}, not run folders: {', '.join(links[:5])}", stacklevel=2
        )
    runs = [
        load_run(child)
        for child in children
        if not child.is_symlink()
        and child.is_dir()
        and ((child / "status.json").exists() or (child / "config.json").exists())
    ]
    # ISO-8601 UTC timestamps of one fixed width sort correctly as strings
    runs.sort(key=lambda run: (run.started or "", run.run_id))
    return runs


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------


def checkpoint_steps(path: str | os.PathLike) -> dict[str, int]:
    """``{tag: step}`` of a run's checkpoints that hold a trainer state (those a resumed run can go on from)."""
    root = Path(path) / "checkpoints"
    steps = {}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not (folder / TRAINER_STATE).is_file():
                continue
            step = (_read_json(folder / "trainer_state.json") or {}).get("step")
            if isinstance(step, int):
                steps[folder.name] = step
    return steps


@dataclass
class ResumePoint:
    """Where `--resume` goes on from: the run folder, its newest checkpoint with a trainer state and its step."""

    path: Path
    tag: str
    step: int
    config: dict  # the run's config.json (with "method" and "meta")

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / self.tag


def find_resume_point(
    resume: str | os.PathLike, out: str | os.PathLike = "runs", *, check_running: bool = True
) -> ResumePoint:
    """The run that `resume` names, a run id under `out` or a run folder, and its newest checkpoint with a
    trainer state (``latest``, ``final`` or ``last``: the one of the highest step). Raises ResumeError, one line:
    no such run, no checkpoint to go on from, or (with `check_running`) the run is still running."""
    text = os.fspath(resume) if isinstance(resume, os.PathLike) else resume
    if not isinstance(text, str) or not text.strip():
        raise ResumeError(f"resume: give a run id (under --out) or a run folder, got {resume!r}")
    candidates = [Path(out) / text] if _SAFE_NAME.fullmatch(text) and not text.startswith(".") else []
    candidates.append(Path(text))
    path = next(
        (
            c
            for c in candidates
            if c.is_dir() and not c.is_symlink() and ((c / "status.json").exists() or (c / "config.json").exists())
        ),
        None,
    )
    if path is None:
        raise ResumeError(f"resume: no run {text!r} in {out}/, nor a run folder at {text}; see: python -m lab runs")
    status = _read_json(path / "status.json") or {}
    run = RunData(path.name, path, _read_json(path / "config.json") or {}, [], [], status)
    alive = status.get("status") == "running" and status.get("pid") != os.getpid() and not run.interrupted
    if check_running and alive:
        raise ResumeError(f"resume: run {path.name} is still running (pid {status.get('pid')}); stop it first")
    steps = checkpoint_steps(path)
    if not steps:
        raise ResumeError(
            f"resume: run {path.name} has no checkpoint to go on from (one is saved every --save-every steps and "
            "when a run stops); start a new run"
        )
    tag = max(steps, key=lambda t: (steps[t], t == "final"))
    return ResumePoint(path=path, tag=tag, step=steps[tag], config=run.config)


def _keep_rows_until(path: Path, step: int) -> list[dict]:
    """Keep the rows of a .jsonl file whose "step" is at most `step` (rewriting it atomically); returns them."""
    rows, _ = _read_jsonl_tolerant(path)
    kept = [row for row in rows if isinstance(row.get("step"), int) and row["step"] <= step]
    if path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in kept)
        with _disk_full_is_user_error(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return kept


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _now() -> str:
    """UTC time, ISO 8601 with milliseconds, so runs created in the same second still sort in order."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _lab_version() -> str:
    try:
        import lab

        version = getattr(lab, "__version__", None)
        if version:
            return str(version)
        from importlib.metadata import version as package_version

        return package_version("lab")
    except Exception:  # not installed as a package: running from a checkout
        return "unknown"


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a dataclass instance, got {type(config).__name__}")
    return _jsonable(config, "config", strict=False)


def _method_from_class(config: Any) -> str | None:
    """GRPOConfig -> "grpo"; None for dicts and None."""
    if config is None or isinstance(config, dict):
        return None
    name = type(config).__name__
    return name[: -len("Config")].lower() if name.endswith("Config") and name != "Config" else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-") or "run"


def _one_line(error: BaseException | str) -> str:
    """'ValueError: first line of the message' for an exception; the first line of a string."""
    if isinstance(error, BaseException):
        text = str(error).strip()
        first = text.splitlines()[0] if text else ""
        return f"{type(error).__name__}: {first}" if first else type(error).__name__
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _jsonable(
    value: Any,
    key: str,
    *,
    strict: bool,
    on_nonfinite: Callable[[str, float], None] | None = None,
) -> Any:
    """`value` as plain JSON data: tensors and numpy values -> Python numbers or lists, non-finite floats
    -> None (reported through `on_nonfinite`), Paths -> str. Anything else raises TypeError if `strict`,
    else becomes its str() (configs may hold objects; metrics must be data)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        if on_nonfinite is not None:
            on_nonfinite(key, value)
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{key}.{k}", strict=strict, on_nonfinite=on_nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key, strict=strict, on_nonfinite=on_nonfinite) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        # torch tensors and numpy arrays/scalars; tolist() of a 0-d one is a Python scalar
        return _jsonable(value.tolist(), key, strict=strict, on_nonfinite=on_nonfinite)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value), key, strict=strict, on_nonfinite=on_nonfinite)
    if strict:
        raise TypeError(f"{key}: cannot write a {type(value).__name__} to JSON")
    return str(value)


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows and fsync, so every line written is on disk before the run goes on."""
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    with _disk_full_is_user_error(path), open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        with _disk_full_is_user_error(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # the old file stays as it was
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def _disk_full_is_user_error(path: Path):
    """Turn "no space left on device" while writing `path` into DiskFull: one line, not a traceback."""
    try:
        yield
    except OSError as err:
        if err.errno in _DISK_FULL and not isinstance(err, UserError):
            raise DiskFull(
                f"no space left on the disk while writing {path}; free some space or choose another "
                "--out (the record keeps every line written before)"
            ) from err
        raise


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_jsonl_tolerant(path: Path) -> tuple[list[dict], int]:
    """(objects, bad line count). Text after the last newline is a line whose writer never finished:
    it is kept if it parses, else skipped without counting it as bad."""
    try:
        # errors="replace": a torn line may end inside a multi-byte character
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    *complete, tail = text.split("\n")
    rows, bad = [], 0
    for line in complete:
        if not line.strip():
            continue
        row = _parse_object(line)
        if row is None:
            bad += 1
        else:
            rows.append(row)
    if tail.strip():
        row = _parse_object(tail)
        if row is not None:
            rows.append(row)
    return rows, bad


def _parse_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this host (a recycled pid reads as alive: rare, and harmless
    since it only means a dead run is listed as running)."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process on Windows; we cannot tell
    try:
        os.kill(pid, 0)  # signal 0: existence check, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # A killed child its parent has not reaped yet is a zombie: it has a pid but will never write again.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
