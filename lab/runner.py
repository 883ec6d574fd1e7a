"""What every trainer does around its loop: seeding, loading, the optimizer, the run record and stopping.

Trainers are generators. Each ``next()`` runs one optimizer step and yields its metrics, so a notebook, the CLI
or the app can show the step as soon as it exists, and can stop between steps. A trainer's body looks like::

    with Run(cfg, "grpo", policy=policy, stop=stop, optimizer=optimizer, state=(generator, batches)) as run:
        for step in run.steps():
            ...one step...
            yield run.log(step, metrics)

``Run`` writes the record: ``config.json`` at the start, one ``metrics.jsonl`` line per step, samples, checkpoints
every ``save_every`` steps (to ``checkpoints/latest``, replaced each time) and at the end (``final``), and a final
status: ``completed``, ``stopped`` (stop event set, SIGTERM, or the generator closed) or ``failed`` (an exception,
which is re-raised after the record is closed). The number of bad data rows skipped under ``skip_bad_rows`` goes into
the status's summary as ``skipped_rows``. With ``cfg.report_to`` the rows also go to a tracker (``lab.trackers``).

Each checkpoint also holds what ``cfg.resume`` needs to go on exactly where the run was: the optimizer and the
``state`` the trainer gave, with the random states (see ``Run``). ``start(method, cfg)`` makes the record before the
trainer starts, so the caller has the run's id and folder before the first step (``Training``).

Two things are never silently wrong:
- a loss or gradient norm that turns NaN or inf stops the run as ``failed`` (`Diverged`), rather than training on
  NaN weights to a ``completed`` status;
- SIGTERM (``kill``, a scheduler's preemption) is handled like Ctrl-C: the current step finishes, the weights are
  saved and the status is ``stopped``. A second SIGTERM kills at once.

Under ``torchrun`` or ``accelerate launch`` (``lab.dist``) rank 0 alone writes the record, the metrics are reduced
over the processes before they are logged, a stop (event, SIGTERM or SIGINT) on any process stops all of them after
the same step, and ``clip_and_step`` sums the gradients over the processes first.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from lab import dist
from lab.config import ConfigError
from lab.methods import METHODS, get_method
from lab.records import TRAINER_STATE, ResumePoint, RunRecord, find_resume_point
from lab.trackers import open_tracker


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
    dist.broadcast_parameters(params)  # several processes: every replica starts from rank 0's weights, as in DDP
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
    micro = _largest_divisor_within(rows, budget // per_row)
    if dist.fsdp():  # each forward and backward is a collective there: every rank takes the smallest of theirs
        micro = int(-dist.global_max(torch.tensor([-float(micro)]))[0])
    return micro


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
        """Σ w·value, over every process of a multi-process run (``lab.dist``: each adds its own rows)."""
        return self._global()[0]

    def means(self) -> dict:
        """Σ w·value / Σ w, both summed over every process: a token-weighted mean of the global batch."""
        sums, weights = self._global()
        return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}

    def _global(self) -> tuple[dict, dict]:
        sums = {key: float(value) for key, value in self._sums.items()}
        return dist.weighted_sums(sums, {key: float(value) for key, value in self._weights.items()})


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
    params = list(params)
    dist.sync_gradients(params)  # several processes: each gradient becomes its sum over them (lab.dist)
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class ShuffledBatches:
    """Endless batches of ``rows``, walking through shuffled epochs: a fresh permutation is appended whenever
    fewer than ``batch_size`` indices are left, so every row is seen once per epoch and batches stay full.
    Naive equivalent: ``random.shuffle(rows)`` each epoch and slice, dropping nothing at epoch ends.

    ``state_dict()`` is the seed and the number of batches drawn; ``load_state_dict()`` replays the shuffles up to
    there (without building the batches), so a resumed run draws the batches the uninterrupted run would have drawn,
    and saving the position costs nothing however large the data."""

    def __init__(self, rows: list, batch_size: int, seed: int):
        if not rows:
            raise ValueError("no rows to batch")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._start(0)

    def _start(self, drawn: int) -> None:
        self._rng = random.Random(self.seed)
        self._order: list[int] = []
        self._next = 0  # index in _order of the next batch's first row
        self.drawn = drawn
        while drawn > 0:  # skip whole runs of batches at once: the replay costs one shuffle an epoch
            self._refill()
            skipped = min(drawn, (len(self._order) - self._next) // self.batch_size)
            self._next += skipped * self.batch_size
            drawn -= skipped

    def _refill(self) -> None:
        if len(self._order) - self._next < self.batch_size:
            self._order, self._next = self._order[self._next :], 0
            while len(self._order) < self.batch_size:
                fresh = list(range(len(self.rows)))
                self._rng.shuffle(fresh)
                self._order += fresh

    def _take(self) -> list[int]:
        self._refill()
        taken = self._order[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        self.drawn += 1
        return taken

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> list:
        return [self.rows[i] for i in self._take()]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self._start(state["drawn"])


def shuffled_batches(rows: list, batch_size: int, seed: int) -> ShuffledBatches:
    """See `ShuffledBatches`."""
    return ShuffledBatches(rows, batch_size, seed)


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


def use_one_thread_for_tiny_models(model, max_params: int = 20_000_000) -> None:
    """On the CPU, a model of a few million parameters runs faster on one thread: at that size the threads
    spend more time synchronising than computing (a GRPO step on arith ran many times slower on two busy cores).
    ``model``: a policy (its ``.model``) or any module. An explicit OMP_NUM_THREADS is respected."""
    import os

    module = getattr(model, "model", model)
    params = list(module.parameters()) if hasattr(module, "parameters") else []
    if params and params[0].device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        if sum(p.numel() for p in params) <= max_params:
            torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------------
# Resuming: what a checkpoint holds besides the weights, so that a resumed run goes on as the uninterrupted one would


def random_states() -> dict:
    """The process-wide random states: python's ``random``, numpy's, torch's CPU one and every CUDA device's."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    """Put back what `random_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(numpy["pos"]), int(numpy["gauss"][0]), float(numpy["gauss"][1])))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def state_of(obj):
    """What a trainer's stateful object holds now: a torch.Generator's state, a ``state_dict()`` (the data order,
    an LR schedule), a dict's items, or a plain object's attributes (PPO's adaptive β)."""
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if hasattr(obj, "state_dict"):
        return copy.deepcopy(obj.state_dict())
    return copy.deepcopy(dict(obj) if isinstance(obj, dict) else vars(obj))


def load_state(obj, state) -> None:
    """Put back what `state_of` returned, in place."""
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif hasattr(obj, "load_state_dict"):
        obj.load_state_dict(state)
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    else:
        vars(obj).update(state)


def trained_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors the optimizer steps, in its order: the adapters (or every weight), PPO's value head too."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> float:
    """Σ of the per-parameter step counts: it grows with every optimizer step, so it tells whether the weights moved."""
    return sum(float(s["step"]) for s in optimizer.state.values() if "step" in s)


def run_config(cfg, method: str) -> dict:
    """What a run's config.json holds: the method and every field of ``cfg`` (a dataclass or a dict)."""
    return {"method": method, **(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))}


def open_record(cfg, method: str) -> RunRecord | None:
    """The record a run of ``method`` with ``cfg`` writes: a new folder under ``cfg.out``, or with ``cfg.resume``
    the resumed run's folder, reopened at its checkpoint's step (`RunRecord.reopen`). None on a process other than
    rank 0 (``lab.dist``: the trainer's Run gets rank 0's folder)."""
    if not dist.is_main():
        return None
    config = run_config(cfg, method)
    if getattr(cfg, "resume", None):
        point = find_resume_point(cfg.resume, cfg.out)
        return RunRecord.reopen(point.path, point.step, config)
    return RunRecord.create(out=cfg.out, run_id=cfg.run_id, config=config, prefix=method)


class Run:
    """The record and stop logic shared by all trainers (see the module docstring).

    To be resumable (``cfg.resume``) a trainer gives its ``optimizer`` and its other ``state``: its torch.Generators,
    its batch iterators (`ShuffledBatches`), an LR schedule, a dict or plain object it carries across steps.
    Checkpoints then hold them with the trained tensors and the process's random states (as of the end of the step
    they follow), and a resumed run puts them all back as its first step starts: after the trainer's set-up and
    its "before" evaluation, which therefore see the same model as the run's first start did.
    """

    def __init__(
        self,
        cfg,
        method: str,
        *,
        policy=None,
        stop: threading.Event | None = None,
        record: RunRecord | None = None,
        save=None,
        optimizer: torch.optim.Optimizer | None = None,
        state: tuple = (),
    ):
        self.cfg = cfg
        self.method = method
        self.stop = stop or threading.Event()
        self.policy = policy
        self.save = save if save is not None else policy  # what checkpoints hold (a policy or a reward model)
        # also for a model the caller loaded and passed in (notebooks, the app): a policy, or a reward model
        use_one_thread_for_tiny_models(policy if policy is not None else self.save)
        self.optimizer = optimizer
        self.state = tuple(obj for obj in state if obj is not None)  # e.g. PPO's ptx batches exist only with ptx
        self._resume: ResumePoint | None = None
        if getattr(cfg, "resume", None):
            self._resume = find_resume_point(cfg.resume, cfg.out, check_running=False)
        self._restored = False
        self._snapshot: dict | None = None  # random states and `state` at the end of the last logged step
        config = run_config(cfg, method)
        dist.check_fsdp(method, getattr(cfg, "mode", None), getattr(cfg, "resume", None))
        for name in ("batch_size", "minibatch_size"):  # several processes: each takes an equal share (lab.dist)
            if dist.world_size() > 1 and config.get(name):
                dist.per_process(config[name], name)
        if record is None and not dist.is_main():  # several processes: rank 0 alone writes the record
            record = dist.NoRecord(dist.broadcast_object(None))
        self.record = record or open_record(cfg, method)
        if self._resume is not None and Path(self.record.path).resolve() != self._resume.path.resolve():
            raise ConfigError(f"resume: the record given writes to {self.record.path}, not to {self._resume.path}")
        if dist.world_size() > 1 and dist.is_main():
            dist.broadcast_object(self.record.path)
        if dist.is_main():  # the same rows, also to TensorBoard, trackio or W&B (lab.trackers)
            resumed_from = self._resume.step if self._resume is not None else None
            tracker = open_tracker(getattr(cfg, "report_to", "none"), self.record, config, resumed_from)
            if tracker is not None:
                self.record.add_tracker(tracker)
        self.step = self._resume.step if self._resume is not None else 0
        self.summary: dict = {"processes": dist.world_size()} if dist.world_size() > 1 else {}
        if dist.fsdp():  # the weights, gradients and optimizer states sharded over the processes (lab.dist)
            self.summary["fsdp"] = "FULL_SHARD" if dist.fsdp_reshard_after_forward() else "SHARD_GRAD_OP"
        last = getattr(self.record, "last_metrics", None)  # a resumed run's clock goes on from its last row
        self.started = time.time() - (float(last.get("time/elapsed", 0.0)) if isinstance(last, dict) else 0.0)
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
            if dist.world_size() > 1:  # a launcher passes Ctrl-C to every rank: all stop after the same step
                self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        """First SIGTERM: stop after this step (the record ends as ``stopped``, with a checkpoint). Second: the
        handler that was there before (by default, terminate now)."""
        if self.stop.is_set() and dist.world_size() > 1:
            return  # torchrun forwards the signal it got (a second one); its SIGKILL after 30 s is the hard stop
        if self.stop.is_set():
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
            return
        self.stop.set()
        print(
            f"{signal.Signals(signum).name}: stopping after step {self.step}, then saving"
            + (" (send it again to stop at once)" if dist.world_size() == 1 else ""),
            file=sys.stderr,
            flush=True,
        )

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if getattr(self, "_previous_sigint", None) is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def steps(self):
        """Step numbers 1..cfg.steps, ending early once a stop was asked for (after the current step). A resumed run
        puts its checkpoint's state back first and starts after its step."""
        first = self._restore() + 1 if self._resume is not None else 1
        for step in range(first, self.cfg.steps + 1):
            if dist.any_set(self.stop.is_set()):  # a stop on any process stops them all
                self.stop.set()
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
        tokens = dist.global_sum(tokens) if tokens is not None else None  # every process's tokens
        if tokens is not None and step_s > 0:
            metrics["time/tokens_per_s"] = tokens / step_s
        device = self._device()
        if device is not None:
            metrics.update(memory_metrics(device))
        metrics = dist.reduce_metrics(metrics)  # as one process on the global batch (lab.dist)
        bad = {k: v for k, v in metrics.items() if _watched(k) and isinstance(v, numbers.Real) and not math.isfinite(v)}
        if step % self.cfg.log_every == 0 or step == self.cfg.steps or bad:
            self.record.log_metrics(step, metrics)
        if bad:
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise Diverged(
                f"step {step}: {what}; the run diverged: lower lr, or check that the rewards are finite and "
                "of a sane scale"
            )
        if self.optimizer is not None:  # what a checkpoint after this step needs to resume from it
            self._snapshot = {
                "step": step,
                "random": random_states(),
                "state": [state_of(obj) for obj in self.state],
                "optimizer_steps": _optimizer_steps(self.optimizer),
            }
        # the final step is saved as "final" on exit; a periodic save replaces the last one (one extra copy on disk)
        every = self.cfg.save_every
        if every and step % every == 0 and step < self.cfg.steps and self.save is not None:
            self._checkpoint("latest")
        return metrics

    def _checkpoint(self, tag: str) -> None:
        """Save the weights under ``tag``, with the trainer state when it matches them (see `_trainer_state`)."""
        if dist.fsdp():  # every rank gathers the sharded weights; rank 0 saves them whole, loadable by one process
            self.record.save_checkpoint(dist.FullWeights(self.save), tag)
            return
        self.record.save_checkpoint(self.save, tag, state=self._trainer_state())

    def _trainer_state(self) -> dict | None:
        """What resuming needs besides the weights: the trained tensors, the optimizer, the random states and the
        trainer's ``state`` as of the last logged step. None without an optimizer, or when the weights moved since
        that step (a run stopped or failed mid-step): a resumed run would not go on from where they are."""
        snap = self._snapshot
        if self.optimizer is None or snap is None or _optimizer_steps(self.optimizer) != snap["optimizer_steps"]:
            return None
        return {
            "format": 1,
            "method": self.method,
            "step": snap["step"],
            "params": [p.detach() for p in trained_tensors(self.optimizer)],
            "optimizer": self.optimizer.state_dict(),
            "random": snap["random"],
            "state": snap["state"],
        }

    def _restore(self) -> int:
        """Put the resumed checkpoint's weights, optimizer, ``state`` and random states back; returns its step."""
        point = self._resume
        where = f"checkpoint {point.tag} of run {point.path.name}"
        if self.optimizer is None:
            raise ConfigError(f"resume: the {self.method} trainer gives Run no optimizer, so it cannot be resumed")
        saved = torch.load(point.checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
        tensors = trained_tensors(self.optimizer)
        if len(saved["params"]) != len(tensors) or any(a.shape != b.shape for a, b in zip(saved["params"], tensors)):
            raise ConfigError(f"resume: {where} holds other tensors than this model trains (another model or mode?)")
        if len(saved["state"]) != len(self.state):
            raise ConfigError(f"resume: {where} was saved by a trainer that kept other state; resume it with its own")
        with torch.no_grad():
            for param, value in zip(tensors, saved["params"]):
                param.copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        for obj, value in zip(self.state, saved["state"]):
            load_state(obj, value)
            if isinstance(obj, torch.Generator) and dist.rank() > 0:  # rank 0's stream: each process draws its own
                obj.manual_seed(int(torch.randint(2**62, (1,), generator=obj, device=obj.device)) + dist.rank())
        set_random_states(saved["random"])
        self._restored = True
        self._snapshot = {
            "step": saved["step"],
            "random": saved["random"],
            "state": saved["state"],
            "optimizer_steps": _optimizer_steps(self.optimizer),
        }
        return int(saved["step"])

    def _device(self) -> torch.device | None:
        """Where the trained model lives: the policy's device, or the saved model's (a reward model)."""
        if self.policy is not None:
            return self.policy.device
        params = getattr(self.save, "parameters", None)
        return next(params()).device if callable(params) else None

    def want_samples(self, step: int) -> bool:
        every = self.cfg.sample_every
        # a step during which Stop came is the run's last: its samples are logged too
        return step == 1 or step == self.cfg.steps or self.stop.is_set() or (every > 0 and step % every == 0)

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
        # a resumed run that ended before its weights were put back has nothing newer than its checkpoints to save
        saving = self.save is not None and (self._resume is None or self._restored)
        if status != "failed" and saving:
            self._checkpoint("final")
        elif saving and self.step >= 1 and not issubclass(exc_type, Diverged) and not dist.fsdp():
            # (under FSDP the saving is a collective, and a failure may have ended only some of the ranks)
            # the weights of a run that failed after training (in its last evaluation, say) are still worth having
            try:
                self._checkpoint("last")
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


# ----------------------------------------------------------------------------------------------------------------------
# Starting a trainer with its record made first


class Training:
    """A trainer whose run record exists before its first step, so a caller knows where it writes at once::

        training = start("grpo", GRPOConfig(steps=20))
        training.run_id, training.path     # the folder already holds config.json and status.json
        for metrics in training:           # one step per item, as the trainer yields them
            ...

    ``stop`` (a threading.Event, made when not given) ends the run after the current step; ``close()`` (or the end
    of a ``with`` block) stops it at once and finishes the record. A new run whose trainer fails before it starts
    (a model that does not load) leaves no folder, as a record that was never written to; a resumed one is finished
    as "failed", and stays resumable.
    """

    def __init__(self, train, cfg, method: str, *, stop: threading.Event | None = None, **kwargs):
        self.cfg, self.method = cfg, method
        self.stop = stop or threading.Event()
        self.record = open_record(cfg, method)
        self._gen = train(cfg, stop=self.stop, record=self.record, **kwargs)

    @property
    def run_id(self) -> str | None:
        return self.record.run_id if self.record is not None else None

    @property
    def path(self) -> Path | None:
        return self.record.path if self.record is not None else None

    @property
    def resumed_from(self) -> int | None:
        """The step of the checkpoint a resumed run goes on from; None for a new run."""
        if self.record is None or not getattr(self.cfg, "resume", None):
            return None
        return self.record.status["resumed"][-1]["from_step"]

    def __iter__(self) -> Training:
        return self

    def __next__(self) -> dict:
        try:
            return next(self._gen)
        except StopIteration:
            self._settle("completed")
            raise
        except BaseException as err:
            self._settle("stopped" if isinstance(err, KeyboardInterrupt) else "failed", err)
            raise

    def close(self) -> None:
        self._gen.close()
        self._settle("stopped")

    def __enter__(self) -> Training:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _settle(self, status: str, error: BaseException | None = None) -> None:
        """Finish a record that the trainer's Run never took over (it ended before its Run started)."""
        record = self.record
        if not isinstance(record, RunRecord) or record.finished:
            return
        if getattr(self.cfg, "resume", None) is None and record.steps == 0 and not record.status["checkpoints"]:
            record.discard()
        else:
            record.finish(status, error=error)


def method_name(train) -> str:
    """The registry's name of a train function (``lab.grpo.train`` → "grpo"), else its module's last part."""
    for name, (module, _, function) in METHODS.items():
        if getattr(train, "__module__", None) == module and getattr(train, "__name__", None) == function:
            return name
    return str(getattr(train, "__module__", "run")).rsplit(".", 1)[-1]


def start(method, cfg, *, stop: threading.Event | None = None, **kwargs) -> Training:
    """Start ``method`` (a name from ``lab.methods.METHODS``, or a train function) on ``cfg``, its run record made
    now: ``.run_id`` and ``.path`` are known before the first step. ``kwargs`` go to the train function
    (``policy=``, PPO's ``value_model=``). With ``cfg.resume`` the resumed run's folder is reopened instead."""
    train = get_method(method)[1] if isinstance(method, str) else method
    return Training(train, cfg, method if isinstance(method, str) else method_name(train), stop=stop, **kwargs)
