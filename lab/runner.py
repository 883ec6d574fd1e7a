"""What every trainer does around its loop: seeding, loading, the optimizer, the run record and stopping.

Trainers are generators. Each ``next()`` runs one optimizer step and yields its metrics, so a notebook, the CLI
or the app can show the step as soon as it exists, and can stop between steps. A trainer's body looks like::

    with Run(cfg, "grpo", policy=policy, stop=stop) as run:
        for step in run.steps():
            ...one step...
            yield run.log(step, metrics)

``Run`` writes the record: ``config.json`` at the start, one ``metrics.jsonl`` line per step, samples, checkpoints
every ``save_every`` steps (to ``checkpoints/latest``, replaced each time) and at the end (``final``), and a final
status: ``completed``, ``stopped`` (stop event set, SIGTERM, or the generator closed) or ``failed`` (an exception,
which is re-raised after the record is closed). The number of bad data rows skipped under ``skip_bad_rows`` goes into
the status's summary as ``skipped_rows``.

Two things are never silently wrong:
- a loss or gradient norm that turns NaN or inf stops the run as ``failed`` (`Diverged`), rather than training on
  NaN weights to a ``completed`` status;
- SIGTERM (``kill``, a scheduler's preemption) is handled like Ctrl-C: the current step finishes, the weights are
  saved and the status is ``stopped``. A second SIGTERM kills at once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
import signal
import sys
import threading
import time

import numpy as np
import torch

from lab.config import ConfigError
from lab.records import RunRecord


class Diverged(ConfigError):
    """A loss or gradient norm turned NaN or inf: the run stops as ``failed`` with this one-line reason."""


def _watched(name: str) -> bool:
    """Metrics whose non-finite value means the weights are (or are about to be) NaN."""
    return name.startswith("loss/") or name in ("loss", "grad/norm")


def _take_skipped_rows() -> int:
    from lab.data import take_skipped_rows

    return take_skipped_rows()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, cfg, only_trainable: bool = True) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's, or bitsandbytes' 8-bit one (``cfg.optim``), whose states take
    2 bytes a parameter instead of 8; the paged variant also moves them to the host when the GPU runs short.
    ``only_trainable=False`` keeps parameters whose requires_grad is off right now (peft turns it off for every
    adapter but the active one, and PPO trains two)."""
    params = [p for p in params if p.requires_grad or not only_trainable]
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters (check --mode)")
    optim = getattr(cfg, "optim", "adamw")
    if optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if params[0].device.type != "cuda":
        from lab.config import ConfigError

        raise ConfigError(f"optim: {optim} runs on a GPU only (bitsandbytes' 8-bit states); use adamw on the CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# Bytes that one completion token costs in a training forward/backward, per unit of vocabulary and of hidden×layers:
# the logits (float32 in the loss), their gradient and one log-softmax chunk make ~3 copies of V floats; the trunk's
# saved activations are ~34·H bytes a layer in 16-bit (Korthikanti et al. 2022), doubled for float32.
_BYTES_PER_VOCAB = 3 * 4
_BYTES_PER_HIDDEN_LAYER = 68


def logits_budget_bytes(device: torch.device) -> int:
    """Memory one training forward/backward may use: ``LAB_MICROBATCH_GB`` if set; else a quarter of the free GPU
    memory, or 2 GB on the CPU."""
    import os

    if os.environ.get("LAB_MICROBATCH_GB"):
        return int(float(os.environ["LAB_MICROBATCH_GB"]) * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return 2_000_000_000


def _shape(config) -> tuple[int, int, int, int, int]:
    """(V, H, L, kv heads, head dim) of a transformers config, under Llama's and GPT-2's names alike."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return config.vocab_size, hidden, layers, kv_heads, head_dim


def _largest_divisor_within(rows: int, fits: int) -> int:
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= max(fits, 1))


def auto_microbatch(
    model, rows: int, tokens_per_row: int, budget_bytes: int | None = None, context_tokens: int = 0
) -> int:
    """The largest divisor of ``rows`` whose forward/backward fits the memory budget.

    A row of ``tokens_per_row`` scored tokens after ``context_tokens`` of prompt costs about
    tokens·12·V + (tokens + context)·68·H·L bytes (see above): only scored positions reach the output layer, every
    position goes through the trunk. Naive equivalent: ``rows`` (one pass for everything), which for a 151k
    vocabulary and 64 × 64 tokens is an 8 GB logits tensor.
    """
    vocab, hidden, layers, _, _ = _shape(model.config)
    tokens = max(tokens_per_row, 1)
    per_row = tokens * _BYTES_PER_VOCAB * vocab + (tokens + context_tokens) * _BYTES_PER_HIDDEN_LAYER * hidden * layers
    budget = budget_bytes if budget_bytes is not None else logits_budget_bytes(next(model.parameters()).device)
    return _largest_divisor_within(rows, budget // per_row)


def auto_generation_batch(model, rows: int, total_tokens: int, budget_bytes: int | None = None) -> int:
    """The largest divisor of ``rows`` that one sampling batch can hold: generation keeps no activations for a
    backward pass, only the KV cache (2 · L · kv_heads · head_dim values per token) and a few (B, V) float32 rows
    of next-token logits. Naive equivalent: ``rows``. ``total_tokens``: prompt plus new tokens."""
    vocab, _, layers, kv_heads, head_dim = _shape(model.config)
    element = next(model.parameters()).element_size() if next(model.parameters()).is_floating_point() else 2
    per_row = 2 * layers * kv_heads * head_dim * element * max(total_tokens, 1) + 4 * 4 * vocab
    budget = budget_bytes if budget_bytes is not None else logits_budget_bytes(next(model.parameters()).device)
    return _largest_divisor_within(rows, budget // per_row)


class MetricAccumulator:
    """Weighted sums of per-microbatch metrics, kept as tensors on the model's device until they are read, so the
    inner loop never waits for the host; the one sync per step happens where the metrics are logged.

    ``add(metrics, weight, weights)`` adds w·value for each metric (``weights`` overrides w per key); ``sums()``
    returns Σ w·value, ``means()`` Σ w·value / Σ w. Naive equivalent: ``total[k] += float(value) * w`` after
    every microbatch (one host–device sync each).
    """

    def __init__(self):
        self._sums: dict = {}
        self._weights: dict = {}

    def add(self, metrics: dict, weight=1.0, weights: dict | None = None) -> None:
        for key, value in metrics.items():
            w = (weights or {}).get(key, weight)
            value = value.detach() if torch.is_tensor(value) else value
            self._sums[key] = self._sums.get(key, 0.0) + value * w
            self._weights[key] = self._weights.get(key, 0.0) + w

    def sums(self) -> dict:
        return {key: float(value) for key, value in self._sums.items()}

    def means(self) -> dict:
        return {key: float(self._sums[key] / self._weights[key]) for key in self._sums if float(self._weights[key]) > 0}


def memory_metrics(device: torch.device) -> dict:
    """``memory/peak_gb``: the peak since the last call on a GPU (allocated by torch), or the process's peak
    resident set on the CPU (it only grows)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_gb": peak}
    import resource

    return {"memory/peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # KiB on Linux


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
    if not rows:
        raise ValueError("no rows to batch")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        yield [rows[i] for i in order[:batch_size]]
        del order[:batch_size]


def load_for(cfg, task=None, prompts: list | None = None):
    """The policy a config asks for: ``cfg.model`` or the task's built-in model, in ``cfg.mode``.

    Given the run's ``prompts``, the tokenizer is checked against them first (in ``load_policy``): conversational
    prompts need a chat template, and a tokenizer without one fails in one line, before the model is loaded."""
    from lab.modeling import load_policy, pick_device

    name = cfg.model or (task.model if task is not None else None)
    checkpointing = cfg.gradient_checkpointing
    if checkpointing is None:  # on where memory is tight and the model is big enough for it to matter
        checkpointing = pick_device(cfg.device).type == "cuda" and not cfg.uses_builtin_model()
    policy = load_policy(
        name,
        task=cfg.task,
        mode=cfg.mode,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=checkpointing,
        prompts=prompts,
    )
    use_one_thread_for_tiny_models(policy)
    return policy


def check_prompts_fit_tokenizer(prompts: list, tokenizer, name: str) -> None:
    """Conversational prompts (message lists) need the tokenizer's chat template: say so in one line."""
    from lab.config import ConfigError

    if not getattr(tokenizer, "chat_template", None) and any(isinstance(p, list) for p in prompts):
        raise ConfigError(
            f"model: the data holds chat messages but the tokenizer of {name!r} has no chat template; "
            "use an instruct model with a template, or give plain-text prompts"
        )


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

    def __init__(
        self,
        cfg,
        method: str,
        *,
        policy=None,
        stop: threading.Event | None = None,
        record: RunRecord | None = None,
        save=None,
    ):
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
        self._step_started = self.started
        self._skipped_rows = _take_skipped_rows()  # loaded before the run started
        self._previous_sigterm = None

    @property
    def path(self):
        return self.record.path

    def __enter__(self) -> Run:
        # only the main thread may install a handler (the app trains in a worker thread; its stop button sets `stop`)
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        """First SIGTERM: stop after this step (the record ends as ``stopped``, with a checkpoint). Second: the
        handler that was there before (by default, terminate now)."""
        if self.stop.is_set():
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
            return
        self.stop.set()
        print(
            f"SIGTERM: stopping after step {self.step}, then saving (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def steps(self):
        """Step numbers 1..cfg.steps, ending early once a stop was asked for (after the current step)."""
        for step in range(1, self.cfg.steps + 1):
            if self.stop.is_set():
                return
            self.step = step
            self._step_started = time.time()  # the step's time excludes the evaluation before the first step
            yield step

    def log(self, step: int, metrics: dict, tokens: int | None = None) -> dict:
        """Record one step's metrics, with ``time/step_s``, ``memory/peak_gb`` and, given the tokens the step
        processed (sampled plus trained on), ``time/tokens_per_s``."""
        now = time.time()
        step_s = now - self._step_started
        metrics = {
            "step": step,
            **{k: float(v) if torch.is_tensor(v) else v for k, v in metrics.items()},
            "time/elapsed": now - self.started,
            "time/step_s": step_s,
        }
        if tokens is not None and step_s > 0:
            metrics["time/tokens_per_s"] = tokens / step_s
        device = self._device()
        if device is not None:
            metrics.update(memory_metrics(device))
        bad = {k: v for k, v in metrics.items() if _watched(k) and isinstance(v, numbers.Real) and not math.isfinite(v)}
        if step % self.cfg.log_every == 0 or step == self.cfg.steps or bad:
            self.record.log_metrics(step, metrics)
        if bad:
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise Diverged(
                f"step {step}: {what}; the run diverged: lower lr, or check that the rewards are finite and "
                "of a sane scale"
            )
        # the final step is saved as "final" on exit; a periodic save replaces the last one (one extra copy on disk)
        every = self.cfg.save_every
        if every and step % every == 0 and step < self.cfg.steps and self.save is not None:
            self.record.save_checkpoint(self.save, "latest")
        return metrics

    def _device(self) -> torch.device | None:
        """Where the trained model lives: the policy's device, or the saved model's (a reward model)."""
        if self.policy is not None:
            return self.policy.device
        params = getattr(self.save, "parameters", None)
        return next(params()).device if callable(params) else None

    def want_samples(self, step: int) -> bool:
        every = self.cfg.sample_every
        return step == 1 or step == self.cfg.steps or (every > 0 and step % every == 0)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.record.log_samples(step, rows)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore_sigterm()
        if exc_type is None:
            status = "stopped" if self.stop.is_set() and self.step < self.cfg.steps else "completed"
        elif exc_type in (GeneratorExit, KeyboardInterrupt):
            status = "stopped"
        else:
            status = "failed"
        if status != "failed" and self.save is not None:
            self.record.save_checkpoint(self.save, "final")
        elif self.save is not None and self.step >= 1 and not issubclass(exc_type, Diverged):
            # the weights of a run that failed after training (in its last evaluation, say) are still worth having
            try:
                self.record.save_checkpoint(self.save, "last")
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
        self.summary.setdefault("steps", self.step)
        skipped = self._skipped_rows + _take_skipped_rows()  # plus any rows loaded inside the run (held-out sets)
        if skipped:
            self.summary["skipped_rows"] = skipped
        self.summary.setdefault("wall_time_s", round(time.time() - self.started, 2))
        error = None if status != "failed" else f"{exc_type.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.record.finish(status, summary=self.summary, error=error)
        return False
