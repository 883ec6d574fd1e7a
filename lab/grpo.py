"""GRPO: PPO's clipped objective with the value function replaced by the group's own rewards.

Paper card
----------
Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", §4.1). For each prompt x, sample a group
of G completions y_1..y_G from π_old, score them, and use the group's z-scored rewards as advantages — no value
network, no GAE::

    Â_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + ε_std)             (same Â_i for every token of y_i)

Then maximize PPO's clipped surrogate with a per-token KL penalty to π_ref (here as a loss to minimize)::

    ρ_it = π_θ(y_it | x, y_i,<t) / π_old(y_it | x, y_i,<t)
    ℓ_it = − min( ρ_it Â_i,  clip(ρ_it, 1 − ε_low, 1 + ε_high) Â_i )  +  β · k3_it
    k3_it = π_ref/π_θ − log(π_ref/π_θ) − 1                               (Schulman 2020: unbiased, ≥ 0)

    L(θ) = (1/G) Σ_i (1/|y_i|) Σ_t ℓ_it                                  ("sequence": DeepSeekMath)

That β · k3_it is DeepSeekMath's. How the KL enters is ``cfg.kl_mode``, and each choice has its own fixed point
(``lab.fixed_points`` computes them exactly on bandit; ``eval/kl_to_fixed_point`` is the distance to it)::

    k1_reward  r_i ← r_i − β Σ_t log(π_old/π_ref)(y_it), before Â     like PPO        fixed point π*  (default)
    k3         ℓ_it += β · k3_it                                      DeepSeekMath    ∇ is ∇KL(π_ref ‖ π_θ)
    k3_ratio   ℓ_it += β · ρ_it · k3_it   (ρ not detached)            TRL's default   ∇ is ∇KL(π_θ ‖ π_ref)

k3's value estimates KL(π_θ‖π_ref) without bias, but the sampling distribution is not differentiated, so its
expected gradient on-policy is E_π[(1 − π_ref/π) ∇log π] = ∇KL(π_ref‖π_θ): the reverse KL. Multiplying by ρ adds
E_π[k3 ∇log π], which makes it ∇E_π[k3] = ∇KL(π_θ‖π_ref) (TRL's ``use_bias_correction_kl``).

Why k1_reward is the default: its fixed point is π* = π_ref·exp(r/β)/Z, the maximizer of E r − β KL(π‖π_ref),
for any G, with or without the std division, and for every loss normalization. Write r'(y) = r(y) − β log π(y)/π_ref(y).

* π* is a fixed point: at π*, r'(y) = β log Z for every y, so every group's rewards are equal, every Â_i = 0, and
  the update is exactly zero — not only in expectation.
* It is the only one (one token, free logits z): the expected step F = E[Σ_i Â_i ∇_z log π(y_i)] / G has
  ⟨F, r'⟩ = E[Σ_i Â_i r'_i] / G (Σ_i Â_i = 0 removes the E_π r' part of ∇_z log π) = E[Σ_i (r'_i − r̄')² / (s + ε)] / G
  (s = 1 − ε = 0 without std scaling), which is > 0 unless r' is constant on π's support, i.e. unless π = π*.

The k3 choices do not reach π*. Without std scaling the group mean includes the sample itself, so the surrogate's
expected step is (G − 1)/G · π(r − E_π r); k3_ratio then settles at π_ref·exp((G − 1) r / (G β))/Z, which is π* at
β·G/(G − 1), and k3 where (G − 1)/G · π(r − E_π r) = β (π − π_ref). With std scaling both move further, since
1/std rescales the reward but not the KL term. On bandit, G = 8, KL(π* ‖ fixed point) as a share of KL(π* ‖ π_ref)::

    scaled (default)     k3: 4% (β = 0.1), 152% (β = 0.5)      k3_ratio: 52%, 354%      k1_reward: 0, 0
    scale_rewards=False  k3: 5%, 8%                             k3_ratio: 0.3%, 1.6%     k1_reward: 0, 0

How the per-token losses are averaged is the main thing later papers changed; each is its own function here:

    sequence   (1/B) Σ_i (1/|y_i|) Σ_t ℓ_it     DeepSeekMath: a long completion's tokens weigh less each
    token      Σ_i Σ_t ℓ_it / Σ_i |y_i|         DAPO (Yu et al. 2025): every token weighs the same
    constant   Σ_i Σ_t ℓ_it / (B · T_max)       Dr. GRPO (Liu et al. 2025): no length bias; with it Dr. GRPO
                                                 also drops the std division (``scale_rewards`` defaults to off)

With one update per rollout (μ = 1) the ratio is exactly 1 and the gradient is the REINFORCE gradient with the
group baseline (tests/test_grpo.py checks it); clipping matters only when a rollout is reused (μ > 1, or several
minibatches per rollout), which is when ``old_logprobs`` are stored. ``kl/old`` and ``ratio/*`` then say how stale
the rollout got (``lab.onpolicy.RatioMeter``); ``clip=False`` drops the clip, and ``lab.ladder`` compares the three.

==============================  ============================================
symbol                          code
==============================  ============================================
G                               ``cfg.group_size``
ε_std                           ``cfg.epsilon_std``
ε_low, ε_high                   ``cfg.epsilon_low``, ``cfg.epsilon_high`` (∞ with ``cfg.clip`` off)
β                               ``cfg.beta`` (0: π_ref is computed only for ``kl/ref``, every ``cfg.kl_every``)
where the KL enters             ``cfg.kl_mode``: ``kl_reward``, ``k3_penalty``, ``k3_ratio_penalty``
μ                               ``cfg.num_iterations``
log π_θ, log π_old, log π_ref   ``logprobs``, ``old_logprobs``, ``ref_logprobs`` (B, T)
r_i, Â_i                        ``rewards``, ``advantages`` (B·G,); per token with ``cfg.reward_mode``
                                ``process`` (B·G, T), ``lab.process_reward``
t ≤ |y_i| (EOS included)        ``completion_mask`` (B, T)
T_max                           ``max_new_tokens``
==============================  ============================================

Batch levels: a rollout batch (``batch_size`` prompts × G completions) → minibatches (``minibatch_size``
completions, one optimizer step each) → microbatches (``microbatch_size`` completions, one forward/backward each,
gradients accumulated). In the loss functions below B counts the completions they are given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lab import dist
from lab.config import ConfigError, OnPolicyConfig, check, opt
from lab.data import prompt_columns
from lab.evaluate import heldout_metrics
from lab.onpolicy import RatioMeter, check_epsilons, clip_bounds, setup
from lab.ops import kl_k3, masked_mean, masked_sum
from lab.process_reward import arith_step_rewards, process_advantages
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

REWARD_MODES = ("outcome", "process")


@dataclass
class GRPOConfig(OnPolicyConfig):
    """GRPO: group-normalized advantages, clipped surrogate, KL to the reference (in the reward by default)."""

    # bandit's optimum π* needs one free logit per answer: LoRA on its 2-layer model was still at 53–66% of the start
    # KL(π*‖π_θ) after 60 steps at β = 0.1 (lr 1e-3 or 5e-3; 1e-2 diverged), full fine-tuning reaches < 1%
    mode: str | None = opt(
        None,
        "full (all weights), lora (peft adapters) or qlora (4-bit nf4 base + adapters); "
        "default: full on bandit, lora elsewhere",
        builtin="lora",
    )
    steps: int = opt(
        60, "rollouts; each is followed by num_iterations × (minibatches) optimizer steps", min=1, max=1_000_000
    )
    batch_size: int | None = opt(
        None,
        "prompts per rollout (each gets group_size completions); default: 12 on "
        "bandit (its 6 prompts twice), 8 elsewhere",
        min=1,
        max=4096,
        builtin=8,
    )
    group_size: int = opt(8, "G: completions per prompt; ≥ 2 so the group has a baseline", min=2, max=1024)
    epsilon_std: float = opt(
        1e-4, "ε added to the group std before dividing (a group of equal rewards gets Â = 0)", min=0.0, max=1.0
    )
    epsilon_low: float = opt(0.2, "ε_low: the ratio is clipped below at 1 − ε_low", min=0.0, max=0.999)
    epsilon_high: float = opt(0.2, "ε_high: the ratio is clipped above at 1 + ε_high (DAPO: 0.28)", min=0.0, max=10.0)
    clip: bool = opt(
        True,
        "clip the ratio to [1 − ε_low, 1 + ε_high]; false: ε = ∞, plain importance sampling −ρ·Â "
        "(the attempt ladder's attempt 2, lab.ladder)",
    )
    beta: float = opt(
        0.0, "β of the KL to π_ref (DeepSeekMath: 0.04; 0: no KL term, π_ref only for kl/ref)", min=0.0, max=100.0
    )
    kl_mode: str = opt(
        "k1_reward",
        "how β·KL enters: k1_reward = r − β·log(π/π_ref) before the group advantage "
        "(fixed point π* ∝ π_ref·e^{r/β}); k3 = β·k3 in the loss (DeepSeekMath; "
        "gradient of KL(π_ref‖π), fixed point ≠ π*); k3_ratio = β·(π/π_old)·k3 (TRL; "
        "gradient of KL(π‖π_ref), fixed point ≠ π* with group advantages)",
        choices=("k1_reward", "k3", "k3_ratio"),
    )
    num_iterations: int = opt(
        1, "μ: optimizer passes over each rollout (> 1 reuses it: ratio ≠ 1, clipping acts)", min=1, max=100
    )
    loss_norm: str = opt(
        "sequence",
        "how per-token losses are averaged: sequence (DeepSeekMath), token (DAPO), constant (Dr. GRPO)",
        choices=("sequence", "token", "constant"),
    )
    scale_rewards: bool | None = opt(
        None, "divide advantages by the group std; default: on, off for loss_norm=constant (Dr. GRPO)"
    )
    reward_mode: str = opt(
        "outcome",
        "outcome: one reward per completion; process: a reward per answer token on arith (right so far or not), "
        "advantages per step (DeepSeekMath §4.1.3, lab.process_reward)",
        choices=REWARD_MODES,
    )
    minibatch_size: int | None = opt(
        None, "completions per optimizer step; default: the whole rollout batch", min=1, max=1_000_000
    )
    eval_every: int = opt(
        10, "greedy held-out evaluation every N steps (0: only before and after)", min=0, max=1_000_000
    )

    def __post_init__(self) -> None:
        bandit = self.task == "bandit"
        if self.mode is None:
            self.mode = "full" if bandit else "lora"
        if self.batch_size is None:
            self.batch_size = 12 if bandit else 8
        # the checks that need a reason come first, so the message says why and not only the range
        if isinstance(self.group_size, int) and self.group_size < 2:
            raise ConfigError(f"group_size: must be ≥ 2 so the group has a baseline, got {self.group_size}")
        check_epsilons(self)
        super().__post_init__()
        check(
            self.loss_norm in LOSS_NORMS, "loss_norm", f"must be one of {', '.join(LOSS_NORMS)}, got {self.loss_norm!r}"
        )
        check(self.kl_mode in KL_MODES, "kl_mode", f"must be one of {', '.join(KL_MODES)}, got {self.kl_mode!r}")
        check(
            self.reward_mode in REWARD_MODES,
            "reward_mode",
            f"must be one of {', '.join(REWARD_MODES)}, got {self.reward_mode!r}",
        )
        if self.reward_mode == "process":
            check(
                self.task == "arith" and self.reward == "gold",
                "reward_mode",
                f"process rewards each answer digit of the built-in arith task: needs task=arith and reward=gold, "
                f"got task={self.task!r}, reward={self.reward!r}",
            )
            check(
                self.beta == 0 or self.kl_mode != "k1_reward",
                "reward_mode",
                "process with beta > 0 needs kl_mode k3 or k3_ratio: k1_reward puts the KL into the outcome reward",
            )
        if self.scale_rewards is None:
            self.scale_rewards = self.loss_norm != "constant"
        rollout_size = self.batch_size * self.group_size
        if self.minibatch_size is not None:
            check(
                rollout_size % self.minibatch_size == 0,
                "minibatch_size",
                f"must divide batch_size × group_size = {rollout_size}, got {self.minibatch_size}",
            )
        minibatch = self.minibatch_size or rollout_size
        if self.microbatch_size is not None:
            check(
                minibatch % self.microbatch_size == 0,
                "microbatch_size",
                f"must divide the minibatch ({minibatch} completions), got {self.microbatch_size}",
            )


# ----------------------------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Â_i = (r_i − mean_g r) / (std_g r + ε)   (``scale=False``: Â_i = r_i − mean_g r, Dr. GRPO)

    rewards: (B·G,), the G completions of a prompt next to each other. std is the unbiased (n − 1) one, as in
    DeepSeekMath's and TRL's code. A group whose rewards are all equal gets Â = 0: it teaches nothing.
    Returns (B·G,).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    advantages = grouped - grouped.mean(-1, keepdim=True)  # (B, G)
    if scale:
        advantages = advantages / (grouped.std(-1, keepdim=True) + eps)  # (B, G)
    return advantages.reshape(-1)  # (B·G,)


# ----------------------------------------------------------------------------------------------------------------------
# The clipped surrogate


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
):
    """ℓ_t = − min( ρ_t Â,  clip(ρ_t, 1 − ε_low, 1 + ε_high) Â ),   ρ_t = exp(log π_θ − log π_old)

    The min makes the objective pessimistic: once ρ has moved past the clip bound in the direction Â rewards,
    the gradient is zero. The clip masks say where that happened (the bounds that actually bind):

        low  = ρ < 1 − ε_low  and Â < 0          high = ρ > 1 + ε_high and Â > 0

    ε_low = ε_high = ∞ (``clip_bounds`` with ``cfg.clip`` off) leaves ℓ_t = −ρ_t Â: importance sampling, no clip.

    logprobs, old_logprobs: (B, T); advantages: (B,) (or (B, T)). Returns (per-token loss (B, T), low, high).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): one advantage for every token of a completion
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages  # (B, T)
    per_token_loss = -torch.min(unclipped, clipped)  # (B, T)
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)  # (B, T)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)  # (B, T)
    return per_token_loss, low, high


# ----------------------------------------------------------------------------------------------------------------------
# Loss normalizations. With gradient accumulation a microbatch sees only part of the minibatch, so each takes the
# minibatch's totals (num_sequences, num_tokens); left as None, the given tensors are the whole minibatch.


def sequence_mean(per_token_loss, completion_mask, *, num_sequences=None, num_tokens=None, max_new_tokens=None):
    """L = (1/B) Σ_i (1/|y_i|) Σ_t m_it ℓ_it   (DeepSeekMath, TRL loss_type="grpo")."""
    lengths = completion_mask.sum(-1).clamp(min=1)  # (B,)
    per_sequence = masked_sum(per_token_loss, completion_mask, dim=-1) / lengths  # (B,)
    return per_sequence.sum() / (num_sequences or per_token_loss.shape[0])


def token_mean(per_token_loss, completion_mask, *, num_sequences=None, num_tokens=None, max_new_tokens=None):
    """L = Σ_i Σ_t m_it ℓ_it / Σ_i |y_i|   (DAPO, TRL loss_type="dapo")."""
    total = num_tokens if num_tokens is not None else completion_mask.sum()
    return masked_sum(per_token_loss, completion_mask) / max(float(total), 1.0)


def constant_norm(per_token_loss, completion_mask, *, num_sequences=None, num_tokens=None, max_new_tokens=None):
    """L = Σ_i Σ_t m_it ℓ_it / (B · T_max)   (Dr. GRPO, TRL loss_type="dr_grpo"); T_max = the length cap."""
    if max_new_tokens is None:
        raise ValueError("loss_norm 'constant' needs max_new_tokens (the completion length cap)")
    B = num_sequences or per_token_loss.shape[0]
    return masked_sum(per_token_loss, completion_mask) / (B * max_new_tokens)


LOSS_NORMS = {"sequence": sequence_mean, "token": token_mean, "constant": constant_norm}


# ----------------------------------------------------------------------------------------------------------------------
# The KL to π_ref: in the reward (k1_reward) or in the loss (k3, k3_ratio). See the module docstring for the fixed
# point of each.


@torch.no_grad()
def kl_reward(
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """r'_i = r_i − β · Σ_t m_it (log π_old(y_it) − log π_ref(y_it))     (k1, summed over the completion, as PPO)

    The sequence log-ratio is an unbiased sample of KL(π_old‖π_ref) and, held fixed (no gradient) like the reward,
    its score-function gradient is the gradient of that KL. rewards (B,); the rest (B, T). Returns (B,).
    """
    log_ratio = masked_sum(old_logprobs - ref_logprobs, completion_mask, dim=-1)  # (B,)
    return rewards - beta * log_ratio


def k3_penalty(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1   (DeepSeekMath eq. 4): on-policy ∇E[k3] is ∇KL(π_ref‖π_θ). (B, T)."""
    return kl_k3(logprobs, ref_logprobs)


def k3_ratio_penalty(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """ρ_t · k3_t,  ρ_t = π_θ/π_old with its gradient (TRL ``use_bias_correction_kl``; DeepSeek-V3.2).

    Same value as k3 on-policy (ρ = 1), but the gradient gains k3 · ∇log π_θ, and E_π[k3 ∇log π + ∇k3] =
    ∇E_π[k3] = ∇KL(π_θ‖π_ref). (B, T).
    """
    return torch.exp(logprobs - old_logprobs) * kl_k3(logprobs, ref_logprobs)


KL_PENALTIES = {"k3": k3_penalty, "k3_ratio": k3_ratio_penalty}  # the KL as a loss term
KL_MODES = ("k1_reward", *KL_PENALTIES)  # k1_reward: the KL in the reward, via kl_reward


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_penalty: str = "k3",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_norm: str = "sequence",
    max_new_tokens: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
):
    """L = norm( ℓ ),  ℓ_it = clipped_surrogate_it + β · penalty_it   (see the module docstring)

    penalty: ``k3_penalty`` (DeepSeekMath) or ``k3_ratio_penalty`` (TRL), by ``kl_penalty``. For kl_mode k1_reward
    the KL is already in the advantages: call this with β = 0.
    logprobs, old_logprobs, ref_logprobs, completion_mask: (B, T); advantages: (B,).
    Returns (loss, metrics); metrics are token means over this (micro)batch; ``kl/ref`` is the k3 value.
    """
    norm = LOSS_NORMS[loss_norm]
    mask = completion_mask.to(logprobs.dtype)  # (B, T)
    per_token_loss, low, high = clipped_surrogate(logprobs, old_logprobs, advantages, epsilon_low, epsilon_high)
    sizes = dict(num_sequences=num_sequences, num_tokens=num_tokens, max_new_tokens=max_new_tokens)
    policy_loss = norm(per_token_loss, mask, **sizes)
    loss = policy_loss
    metrics = {}
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        penalty = KL_PENALTIES[kl_penalty](logprobs, old_logprobs, ref_logprobs)  # (B, T)
        loss = loss + beta * norm(penalty, mask, **sizes)  # the same as adding β·penalty to ℓ: every norm is linear
        metrics["kl/ref"] = masked_mean(kl_k3(logprobs.detach(), ref_logprobs), mask)
    with torch.no_grad():
        metrics.update(
            {
                "loss/policy": policy_loss.detach(),
                "clip/low_frac": masked_mean(low.float(), mask),
                "clip/high_frac": masked_mean(high.float(), mask),
                "clip/frac": masked_mean((low | high).float(), mask),
            }
        )
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: GRPOConfig, *, policy=None, stop: threading.Event | None = None, record=None) -> Iterator[dict]:
    """One rollout and its updates per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    s = setup(cfg, policy)
    policy, task, G = s.policy, s.task, cfg.group_size
    shuffler = torch.Generator().manual_seed(cfg.seed)  # the update's minibatch order
    fixed_point = bandit_fixed_point(cfg, policy, task, s.bandit_ref)  # where this kl_mode settles (bandit, β > 0)

    def evaluate() -> dict:
        return heldout_metrics(policy, task, cfg.eval_size, cfg.beta or None, s.bandit_ref, fixed_point=fixed_point)

    state = (s.generator, shuffler, s.batches)  # what a resumed run puts back, with the optimizer
    with Run(cfg, "grpo", policy=policy, stop=stop, record=record, optimizer=s.optimizer, state=state) as run:
        run.summary["reward"] = s.reward_fn.name
        run.summary["before"] = evaluate()
        for step in run.steps():
            # 1. rollout: every prompt G times, side by side, so groups are contiguous rows
            group_rows = [row for row in dist.shard(next(s.batches)) for _ in range(G)]  # this process's prompts
            roll = rollout(policy, [r["prompt"] for r in group_rows], cfg, s.generator, s.max_new_tokens)  # B·G rows
            # 2. score
            rewards = score(s.reward_fn, roll, prompt_columns(group_rows))  # (B·G,)
            metrics = rollout_metrics(roll, rewards, correct_mask(task, roll))
            # 3. log-probs that stay fixed during the update: π_old and π_ref, when needed
            logged = run.want_samples(step)
            fixed = fixed_logprobs(cfg, policy, roll, step, logged)
            # 4. advantages, from the group alone
            advantages, advantage_metrics = step_advantages(cfg, policy, roll, rewards, fixed)  # (B·G,) or (B·G, T)
            metrics.update(advantage_metrics)
            # 5. update: μ passes over the rollout
            metrics.update(grpo_update(cfg, policy, s, roll, advantages, fixed, shuffler))
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics.update(evaluate())
            if logged:
                rows = sample_rows(
                    roll, rewards, advantages, 2 * G, policy=policy, temperature=cfg.temperature, **fixed.logged()
                )
                run.samples(step, rows)
            yield run.log(step, metrics, tokens=rollout_tokens(roll))
        run.summary["after"] = evaluate()


@dataclass
class FixedLogprobs:
    """The log-probs a step holds fixed while it updates θ. ``old``: log π_old (B·G, T), stored when the rollout is
    reused or the KL goes into the reward; else None (the ratio is 1, and ``logprobs.detach()`` serves). ``ref``: log
    π_ref (B·G, T) when β > 0 or ``kl/ref`` is due, else None. ``logged_old``: log π_old of the rows logged as samples
    this step (when ``old`` is None). ``kl_only``: π_ref is there for the ``kl/ref`` diagnostic alone (β = 0)."""

    old: torch.Tensor | None
    ref: torch.Tensor | None
    logged_old: torch.Tensor | None
    kl_only: bool
    reuse: bool  # later updates see a stale rollout: several passes or several minibatches
    microbatch: int  # completions per forward/backward

    def logged(self) -> dict:
        """The sample rows' fixed log-probs, for ``sample_rows``."""
        return {"logprobs": self.old if self.old is not None else self.logged_old, "ref_logprobs": self.ref}


def fixed_logprobs(cfg: GRPOConfig, policy, roll, step: int, logged: bool) -> FixedLogprobs:
    """3. π_old (if the rollout is reused, or for the KL in the reward) and π_ref (if β > 0, or for kl/ref), in
    no-grad passes of the largest microbatch whose forward/backward fits in memory."""
    rollout_size = len(roll)
    minibatch = dist.per_process(cfg.minibatch_size, "minibatch_size") if cfg.minibatch_size else rollout_size
    microbatch = cfg.microbatch_size or auto_microbatch(
        policy.model, minibatch, roll.completion_ids.shape[1], context_tokens=roll.prompt_ids.shape[1]
    )
    reuse = cfg.num_iterations > 1 or minibatch < rollout_size
    in_reward = cfg.beta > 0 and cfg.kl_mode == "k1_reward"
    old = logprobs_in_chunks(policy.model, roll, cfg.temperature, microbatch) if reuse or in_reward else None
    kl_only = cfg.beta == 0 and kl_due(step, cfg.kl_every)  # π_ref for the kl/ref diagnostic alone
    ref = None
    if cfg.beta > 0 or kl_only:
        with policy.reference() as reference:
            ref = logprobs_in_chunks(reference, roll, cfg.temperature, microbatch)  # (B·G, T)
    logged_old = None
    if logged and old is None:  # the step inspector's π_old, for the logged rows only
        logged_old = logprobs_in_chunks(
            policy.model, roll.select(slice(0, 2 * cfg.group_size)), cfg.temperature, microbatch
        )
    return FixedLogprobs(old, ref, logged_old, kl_only, reuse, microbatch)


def step_advantages(cfg: GRPOConfig, policy, roll, rewards: torch.Tensor, fixed: FixedLogprobs):
    """4. Â from the group: of r, or of r − β·log π_old/π_ref (k1_reward, like PPO's shaped reward); per step with
    ``reward_mode=process``. Returns (advantages (B·G,) or (B·G, T), metrics)."""
    metrics = {}
    if cfg.beta > 0 and cfg.kl_mode == "k1_reward":
        rewards = kl_reward(rewards, fixed.old, fixed.ref, roll.completion_mask, cfg.beta)  # (B·G,)
        metrics["reward/shaped"] = rewards.mean()
        metrics["kl/ref"] = dist.masked_mean(kl_k3(fixed.old, fixed.ref), roll.completion_mask)  # all processes
    group_std = rewards.view(-1, cfg.group_size).std(-1)  # (B,)
    metrics["groups/zero_std_frac"] = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()
    if cfg.reward_mode == "process":
        step_rewards, step_mask = arith_step_rewards(roll, policy.tokenizer)  # (B·G, T), (B·G, T)
        metrics["reward/process"] = masked_mean(step_rewards, step_mask)
        return process_advantages(step_rewards, step_mask, cfg.group_size, cfg.epsilon_std), metrics
    return group_advantages(rewards, cfg.group_size, cfg.epsilon_std, cfg.scale_rewards), metrics


def grpo_update(cfg: GRPOConfig, policy, s, roll, advantages: torch.Tensor, fixed: FixedLogprobs, shuffler) -> dict:
    """5. μ passes over the rollout; each pass: minibatches (one optimizer step each) of microbatches (gradients
    accumulated). Returns the update's metrics: token means of the loss metrics, ``loss/policy`` and ``grad/norm``
    averaged over the optimizer steps, and the ratio's spread over every update (``RatioMeter``)."""
    rollout_size = len(roll)
    minibatch = dist.per_process(cfg.minibatch_size, "minibatch_size") if cfg.minibatch_size else rollout_size
    epsilon_low, epsilon_high = clip_bounds(cfg)
    in_reward = cfg.beta > 0 and cfg.kl_mode == "k1_reward"
    policy.model.train()
    meter, ratios, grad_norms, losses = MetricAccumulator(), RatioMeter(), [], []
    lengths = roll.completion_mask.sum(-1).cpu()  # (B·G,) one copy to the host, for every minibatch's count
    for _ in range(cfg.num_iterations):
        order = torch.randperm(rollout_size, generator=shuffler) if fixed.reuse else torch.arange(rollout_size)
        for start in range(0, rollout_size, minibatch):
            rows = order[start : start + minibatch]
            num_tokens = dist.global_sum(int(lengths[rows].sum()))  # the loss divides by global counts (lab.dist)
            total = 0.0
            for micro_start in range(0, len(rows), fixed.microbatch):
                idx = rows[micro_start : micro_start + fixed.microbatch]
                part = roll.select(idx)
                mask = part.completion_mask.float()  # (b, T)
                logprobs, entropy = completion_logprobs(policy.model, part, cfg.temperature, with_entropy=True)
                idx = idx.to(logprobs.device)
                old = fixed.old[idx] if fixed.reuse else logprobs.detach()  # ratio exactly 1 when fresh
                ref = fixed.ref[idx] if fixed.ref is not None else None
                loss, loss_metrics = grpo_loss(
                    logprobs,
                    old,
                    advantages[idx],
                    mask,
                    ref_logprobs=ref,
                    beta=0.0 if in_reward else cfg.beta,
                    kl_penalty=cfg.kl_mode,  # k1_reward: β = 0
                    epsilon_low=epsilon_low,
                    epsilon_high=epsilon_high,
                    loss_norm=cfg.loss_norm,
                    max_new_tokens=s.max_new_tokens,
                    num_sequences=len(rows) * dist.world_size(),
                    num_tokens=num_tokens,
                )
                loss.backward()
                total = total + loss_metrics.pop("loss/policy")  # a tensor: no sync per microbatch
                loss_metrics["entropy"] = masked_mean(entropy.detach(), mask)
                if fixed.kl_only:  # old is π_old exactly (stored, or this pass before any step): as k1_reward
                    loss_metrics["kl/ref"] = masked_mean(kl_k3(old.detach(), ref), mask)
                meter.add(loss_metrics, weight=mask.sum())
                ratios.add(logprobs, old, mask)
            losses.append(float(dist.global_sum(total)))
            grad_norms.append(clip_and_step(s.optimizer, s.params, cfg.max_grad_norm))
    return {
        **meter.means(),
        **ratios.metrics(),
        "loss/policy": sum(losses) / len(losses),
        "grad/norm": sum(grad_norms) / len(grad_norms),
    }


def bandit_fixed_point(cfg: GRPOConfig, policy, task, ref_logprobs: torch.Tensor | None) -> torch.Tensor | None:
    """log π at the exact fixed point of this config's expected update on an enumerable task's prompts (B, V)
    (the built-in bandit or one declared with ``lab.tasks.EnumerableTask``), for ``eval/kl_to_fixed_point``; None
    on other tasks, at β = 0, or when the rollouts do not sample π_θ itself or are not scored by the gold reward
    (temperature, top_p, reward)."""
    exact = cfg.reward == "gold" and cfg.temperature == 1.0 and cfg.top_p == 1.0  # samples from π_θ, scored by r
    if task is None or task.kind != "bandit" or ref_logprobs is None or cfg.beta <= 0 or not exact:
        return None
    from lab.fixed_points import grpo_fixed_point

    rewards = task.reward_tables(task.eval_prompts(), policy.tokenizer)  # (B, V)
    return grpo_fixed_point(
        ref_logprobs.cpu(), rewards, cfg.beta, cfg.kl_mode, cfg.group_size, cfg.scale_rewards, cfg.epsilon_std
    )
