"""What the policies trained on preference pairs share around their loss (DPO and its variants, SFT on preferred).

Both start the same way (``setup``): seed, task, the training pairs, the policy, optimizer, shuffled batches, how
completions end, the held-out prompts and the pairs' support (for ``eval/mass_off_support``), the microbatch size.
Both evaluate on the same schedule (``is_eval_step``) with the same held-out metrics (``PreferenceSetup.heldout``,
``lab.evaluate.preference_heldout``). The reward model trains on pairs too but has no policy, so it keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lab import dist
from lab.batching import PairBatch, encode_preference_batch, ends_with_eos, pair_microbatch
from lab.data import load_preference_rows, unique_prompts
from lab.evaluate import preference_heldout
from lab.runner import load_for, make_optimizer, seed_everything, shuffled_batches


@dataclass
class PreferenceSetup:
    """What a preference trainer holds before its first step."""

    task: Any  # the built-in task, or None for a data source
    rows: list[dict]  # training pairs {"prompt", "chosen", "rejected", ...}
    policy: Any  # lab.modeling.Policy
    params: list  # the trainable parameters
    optimizer: torch.optim.Optimizer
    batches: Iterator[list[dict]]  # endless shuffled batches of cfg.batch_size pairs
    add_eos: bool  # completions are scored with their end token (not on bandit: one-token answers)
    heldout_prompts: list | None  # a data source's held-out prompts (its first training prompts); None for a task
    support: dict[str, set[str]]  # prompt -> the responses in its pairs
    micro: int  # pairs per forward/backward

    def start(self, run, cfg) -> None:
        """Record the number of pairs and the held-out metrics before the first step (π_θ = π_ref: no kl/ref)."""
        run.summary["rows"] = len(self.rows)
        run.summary["before"] = self.heldout(cfg, use_reference=False)

    def next_batch(self, cfg) -> tuple[int, PairBatch]:
        """B, and this process's next B pairs encoded as one batch: chosen rows 0..B-1, rejected rows B..2B-1."""
        rows = dist.shard(next(self.batches))  # all of them on one process
        return len(rows), encode_preference_batch(self.policy.tokenizer, rows, cfg.max_length, self.add_eos)

    def heldout(self, cfg, use_reference: bool = True) -> dict:
        """The held-out metrics (``lab.evaluate.preference_heldout``) on this run's prompts and support."""
        return preference_heldout(
            self.policy, self.task, cfg, use_reference=use_reference, prompts=self.heldout_prompts, support=self.support
        )


def setup(cfg, policy=None, load: Callable = load_for) -> PreferenceSetup:
    """The set-up DPO and SFT on preferred share; ``policy`` given is used as is, else ``load(cfg, task, prompts)``
    loads it. Naive equivalent: the dozen lines at the top of each trainer, in this order (the seed first)."""
    from lab.tasks import TASKS, get_task
    from lab.tasks.enumerable import pair_support

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    rows = load_preference_rows(cfg, "train")
    policy = policy or load(cfg, task, [r["prompt"] for r in rows])
    params = policy.trainable_parameters()
    return PreferenceSetup(
        task=task,
        rows=rows,
        policy=policy,
        params=params,
        optimizer=make_optimizer(params, cfg),
        batches=shuffled_batches(rows, cfg.batch_size, cfg.seed),
        add_eos=ends_with_eos(task),
        heldout_prompts=None if task is not None else unique_prompts(rows)[: cfg.eval_size],
        support=pair_support(rows),
        micro=pair_microbatch(cfg, policy),
    )


def is_eval_step(cfg, step: int) -> bool:
    """The last step, and every ``cfg.eval_every`` steps when it is > 0."""
    return step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
