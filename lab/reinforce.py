"""REINFORCE: the vanilla policy gradient on sampled completions ("attempt 1").

Paper card
----------
Objective: maximize the expected reward of sampled completions, optionally minus a KL penalty to π_ref::

    J(θ) = E_{x~D, y~π_θ(·|x)} [ r(x, y) − β · log π_θ(y|x) / π_ref(y|x) ]

Its gradient (Williams 1992, the log-derivative trick) needs only log-probs of the sampled tokens::

    ∇J = E[ Σ_t ∇ log π_θ(y_t | x, y_<t) · (R − b) ],     R = r(x, y) − β Σ_t (log π_θ(y_t|…) − log π_ref(y_t|…))

Any b that does not depend on y keeps the estimate unbiased and can cut its variance a lot:

    none   b = 0                       the textbook estimator; every sample pushes up its own probability
    batch  b = mean of R in the batch  (includes the sample itself, so the gradient shrinks by a factor 1 − 1/B)
    ema    b = running mean of R       b_k = d · b_{k−1} + (1 − d) · mean(R_k), used before it sees batch k

One sample per prompt, one gradient step per batch: purely on-policy, so every step pays for a fresh rollout.
PPO and GRPO reuse a rollout for several steps through an importance ratio and clipping (see lab/grpo.py).

==============================  ==========================
symbol                          code
==============================  ==========================
log π_θ(y_t | x, y_<t)          ``logprobs`` (B, T)
log π_ref(y_t | x, y_<t)        ``ref_logprobs`` (B, T)
t ≤ |y| (EOS included)          ``completion_mask`` (B, T)
r(x, y)                         ``rewards`` (B,)
b                               ``baseline`` (cfg.baseline, cfg.baseline_decay)
R − b                           ``advantages`` (B,)
β                               ``cfg.beta``
==============================  ==========================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lab import dist
from lab.config import OnPolicyConfig, check, opt
from lab.data import prompt_columns
from lab.evaluate import heldout_metrics
from lab.onpolicy import setup
from lab.ops import kl_k1, masked_mean
from lab.rollout import (
    completion_logprobs,
    correct_mask,
    kl_due,
    logprobs_in_chunks,
    rollout,
    rollout_metrics,
    rollout_tokens,
    sample_rows,
    score,
)
from lab.runner import MetricAccumulator, Run, auto_microbatch, clip_and_step

BASELINES = ("none", "batch", "ema")
SAMPLE_ROWS = 8  # completions logged as samples, with their per-token numbers (lab.rollout.sample_rows)


@dataclass
class ReinforceConfig(OnPolicyConfig):
    """REINFORCE: policy gradient on sampled completions, with an optional baseline and KL penalty."""

    steps: int = opt(60, "optimizer steps; each samples a fresh batch", min=1, max=1_000_000)
    batch_size: int = opt(64, "prompts per step (one completion each)", min=1, max=4096)
    baseline: str = opt(
        "batch", "b subtracted from the reward: none, batch (batch mean) or ema (running mean)", choices=BASELINES
    )
    baseline_decay: float = opt(0.9, "d of the running-mean baseline b ← d·b + (1−d)·mean(R)", min=0.0, max=0.9999)
    beta: float = opt(
        0.0,
        "β of the KL penalty −β·Σ_t log(π_θ/π_ref) added to the reward (0: no penalty, π_ref only for kl/ref)",
        min=0.0,
        max=100.0,
    )
    eval_every: int = opt(
        20, "greedy held-out evaluation every N steps (0: only before and after)", min=0, max=1_000_000
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.baseline in BASELINES, "baseline", f"must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.microbatch_size is not None:
            check(
                self.batch_size % self.microbatch_size == 0,
                "microbatch_size",
                f"must divide batch_size ({self.batch_size}), got {self.microbatch_size}",
            )


# ----------------------------------------------------------------------------------------------------------------------
# The loss


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor):
    """L(θ) = − (1/B) Σ_b (R_b − b) · Σ_t m_bt · log π_θ(y_bt | x_b, y_b,<t)

    Its gradient is minus the REINFORCE estimate of ∇J above. The advantage is a constant (detached): the
    reward does not depend on θ through the sample's probability, only through which samples are drawn.

    logprobs, completion_mask: (B, T); advantages: (B,). Returns (loss, metrics).
    """
    seq_logprobs = (logprobs * completion_mask).sum(-1)  # (B,) log π_θ(y|x)
    loss = -(advantages.detach() * seq_logprobs).mean()
    with torch.no_grad():
        metrics = {"loss/policy": loss.detach(), "logprobs/mean": masked_mean(logprobs, completion_mask)}
    return loss, metrics


def kl_penalized_rewards(
    rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """R = r − β · Σ_t k1_t,   k1_t = log π_θ(y_t|…) − log π_ref(y_t|…)   (the sequence log-ratio; detached).

    rewards: (B,); the others (B, T). Returns (B,).
    """
    k1 = kl_k1(logprobs.detach(), ref_logprobs) * completion_mask  # (B, T)
    return rewards - beta * k1.sum(-1)  # (B,)


def batch_baseline(returns: torch.Tensor) -> torch.Tensor:
    """b = (1/B) Σ_b R_b, the same for every row: (B,) -> ()."""
    return returns.mean()


def ema_baseline(previous: float | None, returns: torch.Tensor, decay: float) -> tuple[float, float]:
    """(b used now, b for the next step). b used now comes only from earlier batches (so it is independent of
    this batch's samples); the very first step has no history and uses this batch's mean."""
    now = float(returns.mean()) if previous is None else previous
    return now, decay * now + (1.0 - decay) * float(returns.mean())


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: ReinforceConfig, *, policy=None, stop: threading.Event | None = None, record=None) -> Iterator[dict]:
    """One rollout and one optimizer step per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    s = setup(cfg, policy)
    policy, task, reward_fn, optimizer, params = s.policy, s.task, s.reward_fn, s.optimizer, s.params
    batches, generator, max_new_tokens, bandit_ref = s.batches, s.generator, s.max_new_tokens, s.bandit_ref
    carry: dict = {"ema": None}  # the running-mean baseline b, carried from step to step
    state = (generator, batches, carry)  # what a resumed run puts back, with the optimizer

    with Run(cfg, "reinforce", policy=policy, stop=stop, record=record, optimizer=optimizer, state=state) as run:
        run.summary["reward"] = reward_fn.name
        run.summary["before"] = heldout_metrics(policy, task, cfg.eval_size, cfg.beta or None, bandit_ref)
        for step in run.steps():
            # 1. rollout: one completion per prompt, no gradients
            batch = dist.shard(next(batches))  # this process's prompts (all of them on one)
            roll = rollout(policy, [r["prompt"] for r in batch], cfg, generator, max_new_tokens)
            # 2. score
            rewards = score(reward_fn, roll, prompt_columns(batch))  # (B,)
            mask = roll.completion_mask.float()  # (B, T)
            metrics = rollout_metrics(roll, rewards, correct_mask(task, roll))
            microbatch = cfg.microbatch_size or auto_microbatch(
                policy.model, len(roll), roll.completion_ids.shape[1], context_tokens=roll.prompt_ids.shape[1]
            )
            returns = rewards
            ref_logprobs = None
            kl_only = cfg.beta == 0 and kl_due(step, cfg.kl_every)  # π_ref for the kl/ref diagnostic alone
            if kl_only:
                with policy.reference() as ref:
                    ref_logprobs = logprobs_in_chunks(ref, roll, cfg.temperature, microbatch)  # (B, T)
            if cfg.beta > 0:
                # 3. the KL penalty needs log π_θ of the whole batch before any advantage exists: a no-grad pass
                sampled_logprobs = logprobs_in_chunks(policy.model, roll, cfg.temperature, microbatch)  # (B, T)
                with policy.reference() as ref:
                    ref_logprobs = logprobs_in_chunks(ref, roll, cfg.temperature, microbatch)  # (B, T)
                returns = kl_penalized_rewards(rewards, sampled_logprobs, ref_logprobs, mask, cfg.beta)  # (B,)
                metrics["kl/ref"] = dist.masked_mean(kl_k1(sampled_logprobs, ref_logprobs), mask)  # all processes
            # 4. advantages: R − b
            if cfg.baseline == "none":
                baseline = torch.zeros(())
            elif cfg.baseline == "batch":
                baseline = batch_baseline(dist.gather(returns))  # of the global batch
            else:
                b, carry["ema"] = ema_baseline(carry["ema"], dist.gather(returns), cfg.baseline_decay)
                baseline = torch.tensor(b)
            advantages = returns - baseline.to(returns.device)  # (B,)
            # 5. update: microbatches of b rows; each loss is a mean over b, so × b/B makes the sum the batch mean
            policy.model.train()
            all_tokens = dist.global_sum(mask.sum()).clamp(min=1)  # every process's completion tokens
            totals, sampled = MetricAccumulator(), []  # sampled: log π_old of the rows logged as samples
            for start in range(0, len(roll), microbatch):
                rows_ = slice(start, start + microbatch)
                part = roll.select(rows_)
                logprobs, entropy = completion_logprobs(
                    policy.model, part, cfg.temperature, with_entropy=True
                )  # (b, T), entropy without grad
                share = len(part) / cfg.batch_size  # of the global batch (every process's rows)
                loss, loss_metrics = reinforce_loss(logprobs, advantages[rows_], mask[rows_])
                (loss * share).backward()
                if start < SAMPLE_ROWS:  # before the one optimizer step: the policy that sampled
                    sampled.append(logprobs.detach())
                loss_metrics["entropy"] = masked_mean(entropy, mask[rows_])
                if kl_only:  # before the one optimizer step, π_θ here is the policy that sampled: as with β > 0
                    loss_metrics["kl/ref"] = masked_mean(kl_k1(logprobs.detach(), ref_logprobs[rows_]), mask[rows_])
                tokens_share = mask[rows_].sum() / all_tokens  # a tensor: no sync per microbatch
                totals.add(loss_metrics, tokens_share, {"loss/policy": share})  # a row mean, the rest token means
            metrics.update(totals.sums())
            metrics["grad/norm"] = clip_and_step(optimizer, params, cfg.max_grad_norm)
            metrics["reward/baseline"] = float(baseline)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics.update(heldout_metrics(policy, task, cfg.eval_size, cfg.beta or None, bandit_ref))
            if run.want_samples(step):
                logged = dict(logprobs=torch.cat(sampled), ref_logprobs=ref_logprobs)
                rows = sample_rows(
                    roll, rewards, advantages, SAMPLE_ROWS, policy=policy, temperature=cfg.temperature, **logged
                )
                run.samples(step, rows)
            yield run.log(step, metrics, tokens=rollout_tokens(roll))
        run.summary["after"] = heldout_metrics(policy, task, cfg.eval_size, cfg.beta or None, bandit_ref)
