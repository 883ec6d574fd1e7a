"""What the policy-gradient trainers share around their loss: the set-up, and how far a reused rollout has gone stale.

REINFORCE and GRPO start the same way: seed, task, reward, training rows, policy, optimizer, sampler, batches
(``setup``). PPO adds a value model and a ptx stream, so it keeps its own set-up.

When a rollout is reused (μ > 1 passes, or several minibatches per rollout), the policy being updated drifts away
from the one that sampled. ``RatioMeter`` measures how far, over every token of every update of one rollout::

    ρ_t      = π_θ(y_t|s_t) / π_old(y_t|s_t)
    kl/old   = mean_t [ ρ_t log ρ_t − (ρ_t − 1) ]          KL(π_θ‖π_old) per token, from π_old's samples
    ratio/max, ratio/min, ratio/std                         the spread of ρ_t

E_{y~π_old}[ρ log ρ] = Σ_y π_θ log(π_θ/π_old) = KL(π_θ‖π_old), and E_{π_old}[ρ − 1] = 0, so the estimate is unbiased;
x log x − (x − 1) ≥ 0 makes every term non-negative (as k3 does for the other direction). On the first update of a
fresh rollout ρ = 1 exactly: kl/old = 0, ratio/max = ratio/min = 1, ratio/std = 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lab import dist
from lab.ops import masked_mean


@dataclass
class Setup:
    """What a policy-gradient trainer holds before its first step."""

    task: Any  # the built-in task, or None for a data source
    reward_fn: Any  # r(x, y), lab.rewards.make_reward
    rows: list[dict]  # training rows {"prompt", **columns}
    policy: Any  # lab.modeling.Policy
    params: list  # the trainable parameters
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the sampler's random stream, on the policy's device
    batches: Iterator[list[dict]]  # endless shuffled batches of cfg.batch_size rows
    max_new_tokens: int  # the completion length cap
    bandit_ref: torch.Tensor | None  # π_ref's next-token log-probs on bandit at β > 0 (B, V), else None


def setup(cfg, policy=None) -> Setup:
    """The set-up REINFORCE and GRPO share; ``policy`` given is used as is, else ``cfg`` picks and loads it.

    Naive equivalent: the dozen lines at the top of each trainer, in this order (the order fixes the random streams:
    the seed, then the reward model, then the policy's initialisation)."""
    from lab.rewards import make_reward
    from lab.rollout import bandit_reference, load_prompt_rows, resolve_max_new_tokens
    from lab.runner import load_for, make_optimizer, seed_everything, shuffled_batches
    from lab.tasks import TASKS, get_task

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    reward_fn = make_reward(cfg.reward, task)
    rows = load_prompt_rows(cfg, task)  # {"prompt", **columns}: the columns go to the reward function
    policy = policy or load_for(cfg, task, [r["prompt"] for r in rows])
    params = policy.trainable_parameters()
    return Setup(
        task=task,
        reward_fn=reward_fn,
        rows=rows,
        policy=policy,
        params=params,
        optimizer=make_optimizer(params, cfg),
        generator=torch.Generator(device=policy.device).manual_seed(cfg.seed + dist.rank()),  # one stream a process
        batches=shuffled_batches(rows, cfg.batch_size, cfg.seed),
        max_new_tokens=resolve_max_new_tokens(cfg, task),
        bandit_ref=bandit_reference(policy, task),  # π_ref over the vocabulary on bandit: eval/kl_ref, π*
    )


# ----------------------------------------------------------------------------------------------------------------------
# How stale a reused rollout is


@torch.no_grad()
def kl_to_old(logprobs: torch.Tensor, old_logprobs: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """kl/old = mean_t [ρ_t log ρ_t − (ρ_t − 1)],  ρ_t = exp(log π_θ − log π_old): KL(π_θ‖π_old) per token, unbiased
    on π_old's samples and never negative (see the module docstring). (B, T) in, a scalar out."""
    log_ratio = logprobs.detach().float() - old_logprobs.float()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    return masked_mean(ratio * log_ratio - (ratio - 1.0), completion_mask)


class RatioMeter:
    """``kl/old``, ``ratio/mean``, ``ratio/max``, ``ratio/min`` and ``ratio/std`` over every real token of every update
    of one rollout, kept on the device until read (one sync per step).

    ``add`` once per microbatch forward, with the log-probs the loss used. The std is the pooled one over all those
    tokens, from sums of (ρ − 1) and (ρ − 1)², which keeps float32 precise when ρ is near 1. Naive equivalent:
    concatenate every update's ρ_t over the real tokens, then take mean, max, min and std (population)."""

    def __init__(self):
        self.count = self.sum = self.sum_sq = self.kl = None
        self.max = self.min = None

    @torch.no_grad()
    def add(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, completion_mask: torch.Tensor) -> None:
        keep = completion_mask.bool()  # (b, T)
        log_ratio = (logprobs.detach().float() - old_logprobs.float())[keep]  # (N,) real tokens only
        ratio = torch.exp(log_ratio)  # (N,)
        if ratio.numel() == 0:
            return
        shifted = ratio - 1.0  # (N,)
        parts = {
            "count": keep.sum().float(),
            "sum": shifted.sum(),
            "sum_sq": (shifted**2).sum(),
            "kl": (ratio * log_ratio - shifted).sum(),
        }
        for name, value in parts.items():
            total = getattr(self, name)
            setattr(self, name, value if total is None else total + value)
        self.max = ratio.max() if self.max is None else torch.maximum(self.max, ratio.max())
        self.min = ratio.min() if self.min is None else torch.minimum(self.min, ratio.min())

    def metrics(self) -> dict:
        if self.count is None:
            return {}
        # several processes (lab.dist): over every process's tokens
        count, total, total_sq, kl = dist.global_sum(torch.stack([self.count, self.sum, self.sum_sq, self.kl]))
        largest, neg_smallest = dist.global_max(torch.stack([self.max, -self.min]))
        mean_shift = total / count
        variance = (total_sq / count - mean_shift**2).clamp(min=0.0)
        return {
            "kl/old": kl / count,
            "ratio/mean": 1.0 + mean_shift,
            "ratio/max": largest,
            "ratio/min": -neg_smallest,
            "ratio/std": variance.sqrt(),
        }


def check_epsilons(cfg) -> None:
    """ε_low must keep the lower clip bound 1 − ε_low positive; checked before the ranges so the message says why."""
    from lab.config import check

    if isinstance(cfg.epsilon_low, (int, float)) and not isinstance(cfg.epsilon_low, bool):
        check(
            0.0 <= cfg.epsilon_low < 1.0,
            "epsilon_low",
            f"must be in [0, 1) so the lower clip bound 1 − ε_low stays positive (clip=false for no clip), "
            f"got {cfg.epsilon_low}",
        )


def clip_bounds(cfg) -> tuple[float, float]:
    """(ε_low, ε_high) of a config: its epsilons, or (∞, ∞) with ``cfg.clip`` off, so that clip(ρ, 1 − ε_low,
    1 + ε_high) = ρ and the surrogate is plain importance sampling, −ρ·A."""
    if not cfg.clip:
        return float("inf"), float("inf")
    return cfg.epsilon_low, cfg.epsilon_high
