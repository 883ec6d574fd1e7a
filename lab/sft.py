"""Supervised fine-tuning: the reference policy every other method starts from.

Paper card
----------
Objective (maximum likelihood on demonstrations, loss on completion tokens only)::

    L_SFT(θ) = − E_{(x, y) ~ D} [ (1/|y|) Σ_t log π_θ(y_t | x, y_<t) ]

InstructGPT (Ouyang et al. 2022) trains this "SFT model" first; it becomes π_ref for PPO and DPO. The prompt's
tokens are context, not targets: masking them out of the loss is what makes it *conditional* generation.

==========================  ==========================
symbol                      code
==========================  ==========================
π_θ(y_t | x, y_<t)          ``logprobs`` (B, L-1)
token t belongs to y        ``completion_mask`` (B, L-1)
L_SFT                       ``sft_loss``
==========================  ==========================

The same loss, weighted by λ, is the "pretraining mix" (ptx) term of PPO-RLHF.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lab import dist
from lab.batching import encode_pairs, token_logprobs
from lab.config import MicrobatchConfig, OfflineConfig, SampledKLConfig, check, opt
from lab.data import unique_prompts
from lab.evaluate import evaluate, greedy_samples, step_kl
from lab.ops import masked_mean
from lab.rollout import kl_due
from lab.runner import (
    MetricAccumulator,
    Run,
    auto_microbatch,
    clip_and_step,
    load_for,
    make_optimizer,
    seed_everything,
    shuffled_batches,
)


@dataclass
class SFTConfig(OfflineConfig, MicrobatchConfig, SampledKLConfig):
    """Supervised fine-tuning on demonstrations (prompt, completion), the loss on completion tokens only."""

    steps: int = opt(60, "optimizer steps", min=1, max=1_000_000)
    batch_size: int = opt(32, "rows per step", min=1, max=4096)
    per_sequence: bool = opt(
        False, "average the loss per sequence first (every row weighs the same) instead of over all completion tokens"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.task != "bandit", "task", "bandit has no demonstrations to imitate; use arith or reviews")


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor, per_sequence: bool = False):
    """L = − Σ_{b,t} m_bt · log π_θ(y_bt) / Σ_{b,t} m_bt   (token mean; ``per_sequence``: mean over rows of the
    row's token mean).

    logprobs, completion_mask: (B, T). Returns (loss, metrics).
    """
    nll = -logprobs  # (B, T)
    if per_sequence:
        row = (nll * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1)  # (B,)
        loss = row.mean()
    else:
        loss = masked_mean(nll, completion_mask)
    with torch.no_grad():
        tokens = completion_mask.sum()
        metrics = {
            "loss/sft": loss.detach(),
            "logprobs/mean": masked_mean(logprobs, completion_mask),
            "ppl": torch.exp(masked_mean(nll, completion_mask)),
            "tokens": tokens,
        }
    return loss, metrics


class SFTAccumulator:
    """Gradient accumulation of ``sft_loss`` over microbatches, so that the sum equals the whole batch's loss.

    A microbatch's loss is a mean over its own tokens (or rows, ``per_sequence``), so it is weighted by its share of
    the batch's completion tokens (rows). Token means among the metrics take the token share; ``ppl`` is rebuilt
    from the batch's mean log-prob at the end. Naive equivalent: ``sft_loss`` of the whole batch in one pass.
    """

    def __init__(self, batch_tokens, batch_rows: int, per_sequence: bool):
        self.tokens, self.rows, self.per_sequence = batch_tokens, batch_rows, per_sequence
        self.totals = MetricAccumulator()

    def backward(self, logprobs: torch.Tensor, mask: torch.Tensor) -> None:
        """logprobs, mask: (b, L-1) of one microbatch's rows."""
        loss, metrics = sft_loss(logprobs, mask, self.per_sequence)
        token_share = mask.sum() / self.tokens
        share = logprobs.shape[0] / self.rows if self.per_sequence else token_share
        (loss * share).backward()
        metrics.pop("ppl")
        self.totals.add(metrics, token_share, {"tokens": 1.0, "loss/sft": share})

    def result(self) -> dict:
        import math

        sums = self.totals.sums()
        return {**sums, "ppl": math.exp(-sums["logprobs/mean"])}


def load_sft_rows(cfg) -> list[dict]:
    from lab.data import load_rows

    return list(load_rows(cfg.task, format="prompt_completion", skip_bad_rows=cfg.skip_bad_rows))


def train(cfg: SFTConfig, *, policy=None, stop: threading.Event | None = None, record=None) -> Iterator[dict]:
    """One optimizer step per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    from lab.tasks import TASKS, get_task

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    rows = load_sft_rows(cfg)
    policy = policy or load_for(cfg, task, [r["prompt"] for r in rows])
    params = policy.trainable_parameters()
    optimizer = make_optimizer(params, cfg)
    batches = shuffled_batches(rows, cfg.batch_size, cfg.seed)
    kl_prompts = None if task is not None else unique_prompts(rows)[: cfg.kl_prompts]  # own data: training prompts

    with Run(cfg, "sft", policy=policy, stop=stop, record=record, optimizer=optimizer, state=(batches,)) as run:
        run.summary["rows"] = len(rows)
        for step in run.steps():
            # 1. batch: the next B rows of shuffled epochs of the data
            batch_rows = dist.shard(next(batches))  # this process's rows (all of them on one)
            batch = encode_pairs(
                policy.tokenizer,
                [r["prompt"] for r in batch_rows],
                [r["completion"] for r in batch_rows],
                max_length=cfg.max_length,
            )
            # kl/ref before this step's update, from fresh samples of π_θ: the demonstrations are not π_θ's
            due = kl_due(step, cfg.kl_every)
            kl_ref = step_kl(policy, task, cfg, kl_prompts, seed=cfg.seed + step) if due else None
            # 2. loss on completion tokens only, over microbatches of b rows that fit in memory
            policy.model.train()
            B, L = batch.input_ids.shape
            micro = cfg.microbatch_size or auto_microbatch(policy.model, B, L)
            tokens = dist.global_sum(batch.completion_mask[:, 1:].sum()).clamp(min=1)  # of every process's rows
            accumulator = SFTAccumulator(tokens, cfg.batch_size, cfg.per_sequence)
            for start in range(0, B, micro):
                part = batch.select(slice(start, start + micro)).to(policy.device)
                logprobs, mask = token_logprobs(policy.model, part)  # (b, L-1), (b, L-1)
                accumulator.backward(logprobs, mask)
            metrics = accumulator.result()
            if kl_ref is not None:
                metrics["kl/ref"] = kl_ref
            # 3. update
            metrics["grad/norm"] = clip_and_step(optimizer, params, cfg.max_grad_norm)
            if run.want_samples(step) and task is not None:
                run.samples(step, greedy_samples(policy, task, cfg.max_new_tokens))
            yield run.log(step, metrics, tokens=int(batch.attention_mask.sum()))
        if task is not None:
            run.summary["eval"] = evaluate(policy, task, n=cfg.eval_size)
