"""What every trainer does around its loop: seeding, loading, the optimizer, the run record and stopping.

Trainers are generators. Each ``next()`` runs one optimizer step and yields its metrics, so a notebook, the CLI
or the app can show the step as soon as it exists, and can stop between steps. A trainer's body looks like::

    with Run(cfg, "grpo", policy=policy, stop=stop) as run:
        for step in run.steps():
            ...one step...
            yield run.log(step, metrics)

``Run`` writes the record: ``config.json`` at the start, one ``metrics.jsonl`` line per step, samples, checkpoints
every ``save_every`` steps and at the end, and a final status: ``completed``, ``stopped`` (stop event set or the
generator closed) or ``failed`` (an exception, which is re-raised after the record is closed).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import numpy as np
import torch

from lab.records import RunRecord


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters (check --mode)")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_grad_norm: float) -> float:
    """Clip the global gradient norm, take the step, clear the gradients. Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def shuffled_batches(rows: list, batch_size: int, seed: int):
    """Endless batches of ``rows``, walking through shuffled epochs: a fresh permutation is appended whenever
    fewer than ``batch_size`` indices are left, so every row is seen once per epoch and batches stay full.
    Naive equivalent: ``random.shuffle(rows)`` each epoch and slice, dropping nothing at epoch ends."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        yield [rows[i] for i in order[:batch_size]]
        del order[:batch_size]


def load_for(cfg, task=None):
    """The policy a config asks for: ``cfg.model`` or the task's built-in model, in ``cfg.mode``."""
    from lab.modeling import load_policy

    name = cfg.model or (task.model if task is not None else None)
    policy = load_policy(name, task=cfg.task, mode=cfg.mode, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                         lora_dropout=cfg.lora_dropout, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    use_one_thread_for_tiny_models(policy)
    return policy


def use_one_thread_for_tiny_models(policy, max_params: int = 20_000_000) -> None:
    """On the CPU, a model of a few million parameters runs faster on one thread: at that size the threads
    spend more time synchronising than computing (a GRPO step on arith ran many times slower on two busy cores).
    An explicit OMP_NUM_THREADS is respected."""
    import os

    if policy.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if policy.num_parameters()["total"] <= max_params:
            torch.set_num_threads(1)


class Run:
    """The record and stop logic shared by all trainers (see the module docstring)."""

    def __init__(self, cfg, method: str, *, policy=None, stop: threading.Event | None = None,
                 record: RunRecord | None = None, save=None):
        self.cfg = cfg
        self.method = method
        self.stop = stop or threading.Event()
        self.policy = policy
        self.save = save if save is not None else policy  # what checkpoints hold (a policy or a reward model)
        config = {"method": method, **(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))}
        self.record = record or RunRecord.create(out=cfg.out, run_id=cfg.run_id, config=config, prefix=method)
        self.step = 0
        self.summary: dict = {}
        self.started = time.time()

    @property
    def path(self):
        return self.record.path

    def __enter__(self) -> "Run":
        return self

    def steps(self):
        """Step numbers 1..cfg.steps, ending early once a stop was asked for (after the current step)."""
        for step in range(1, self.cfg.steps + 1):
            if self.stop.is_set():
                return
            self.step = step
            yield step

    def log(self, step: int, metrics: dict) -> dict:
        metrics = {"step": step, **{k: float(v) if torch.is_tensor(v) else v for k, v in metrics.items()},
                   "time/elapsed": time.time() - self.started}
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.record.log_metrics(step, metrics)
        if self.cfg.save_every and step % self.cfg.save_every == 0 and self.save is not None:
            self.record.save_checkpoint(self.save, f"step-{step}")
        return metrics

    def want_samples(self, step: int) -> bool:
        every = self.cfg.sample_every
        return step == 1 or step == self.cfg.steps or (every > 0 and step % every == 0)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.record.log_samples(step, rows)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "stopped" if self.stop.is_set() and self.step < self.cfg.steps else "completed"
        elif exc_type in (GeneratorExit, KeyboardInterrupt):
            status = "stopped"
        else:
            status = "failed"
        if status != "failed" and self.save is not None:
            self.record.save_checkpoint(self.save, "final")
        self.summary.setdefault("steps", self.step)
        self.summary.setdefault("wall_time_s", round(time.time() - self.started, 2))
        error = None if status != "failed" else f"{exc_type.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.record.finish(status, summary=self.summary, error=error)
        return False
