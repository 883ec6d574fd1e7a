"""Exact fixed points of GRPO's expected update on an enumerable one-token task (``bandit``).

On ``bandit`` a completion is one token y of the vocabulary, so a policy is a softmax over free logits z (V,) per
prompt. With μ = 1 (ratio 1) the expected GRPO step in logit space, per prompt, is

    Δz_v = π(v) · ψ_v,     ψ_v = a_v − β · κ_v

    a_v = E[ Σ_i Â_i · 1[y_i = v] ] / (G · π(v))      the group advantage the token gets on average, per unit of mass
    κ_v = 1 − π_ref(v)/π(v)                              kl_mode k3: ∇ of KL(π_ref ‖ π), divided by π(v)
    κ_v = log π(v)/π_ref(v) − KL(π ‖ π_ref)             kl_mode k3_ratio: ∇ of KL(π ‖ π_ref), divided by π(v)
    κ_v = 0, and r → r − β · log π/π_ref in Â           kl_mode k1_reward (the KL is in the reward)

The expectation over the G samples of a group is exact: tokens with the same reward are exchangeable, so the group's
advantages depend only on how many of its samples fall in each reward class, and those counts are multinomial. A
prompt with K reward classes has C(K + G − 1, G) count vectors (bandit: K ≤ 6, G = 8 → at most 1,287).

A fixed point is where ψ = 0. We find it by the flow z ← z + η · clip(ψ, −1, 1) started at π_ref (the step in
z is ψ, not π ⊙ ψ: a preconditioning that keeps the zeros and lets rare tokens converge as fast as common ones).
From π_ref every token of a class keeps the same ratio π/π_ref along the flow, so the flow runs on the K class
masses, and each token's probability is π_ref(v) · (π_C / π_ref,C) at the end.

    symbol         code
    π, π_ref       ``logprobs``, ``ref_logprobs`` (B, V) log-probs
    r              ``rewards`` (B, V)
    G, β           ``group_size``, ``beta``
    a, ψ           ``class_advantages``, ``update_direction``
"""

from __future__ import annotations

import functools
import math

import torch

KL_MODES = ("k1_reward", "k3", "k3_ratio")


@functools.lru_cache(maxsize=64)
def group_counts(num_classes: int, group_size: int) -> torch.Tensor:
    """Every way G samples fall into K classes: (M, K) long, rows summing to G, M = C(K + G − 1, G)."""
    if num_classes == 1:
        return torch.tensor([[group_size]])
    rows = []
    for first in range(group_size, -1, -1):
        rest = group_counts(num_classes - 1, group_size - first)  # (m, K − 1)
        rows.append(torch.cat([torch.full((rest.shape[0], 1), first), rest], dim=1))
    return torch.cat(rows)  # (M, K)


def class_advantages(
    class_logprobs: torch.Tensor, class_rewards: torch.Tensor, group_size: int, scale: bool, eps: float
) -> torch.Tensor:
    """a_k = E[ n_k · Â_k ] / (G · p_k), exactly, for one prompt's K reward classes: (K,) float64.

    n (M, K) are the group's counts, multinomial(G, p); Â_k = (r_k − mean) / (std + ε) the advantage of each sample of
    class k in that group (``scale=False``: r_k − mean), with mean and unbiased std over the G samples, as in
    ``lab.grpo.group_advantages``. P(n) · n_k / p_k is computed in log space, so a class of tiny mass is exact too.
    Without std scaling a_k = (G − 1)/G · (r_k − E_p r) in closed form (tests/test_grpo.py checks it).

    class_logprobs, class_rewards: (K,). Returns (K,).
    """
    counts = group_counts(class_rewards.numel(), group_size).to(torch.float64)  # (M, K)
    r = class_rewards.to(torch.float64)  # (K,)
    mean = counts @ r / group_size  # (M,)
    var = (counts * (r[None, :] - mean[:, None]) ** 2).sum(-1) / (group_size - 1)  # (M,) unbiased
    advantages = r[None, :] - mean[:, None]  # (M, K)
    if scale:
        denominator = (var.sqrt() + eps)[:, None]  # (M, 1); 0 only for a group of equal rewards (ε = 0): Â = 0
        advantages = torch.where(denominator > 0, advantages / denominator, torch.zeros_like(advantages))  # (M, K)
    logp = class_logprobs.to(torch.float64).clamp(min=-700.0)  # (K,)
    log_multinomial = math.lgamma(group_size + 1) - torch.lgamma(counts + 1).sum(-1) + counts @ logp  # (M,)
    log_weight = log_multinomial[:, None] + counts.clamp(min=1).log() - logp[None, :]  # (M, K) log P(n)·n_k/p_k
    weight = torch.where(counts > 0, log_weight.exp(), torch.zeros_like(log_weight))  # (M, K)
    return (weight * advantages).sum(0) / group_size  # (K,)


def update_direction(
    class_logprobs: torch.Tensor,
    class_ref_logprobs: torch.Tensor,
    class_rewards: torch.Tensor,
    beta: float,
    kl_mode: str,
    group_size: int,
    scale: bool,
    eps: float,
) -> torch.Tensor:
    """ψ_k = a_k − β · κ_k for one prompt's classes (see the module docstring): (K,) float64; 0 at a fixed point."""
    logp = class_logprobs.to(torch.float64)  # (K,)
    ref = class_ref_logprobs.to(torch.float64)  # (K,)
    if kl_mode == "k1_reward":
        shaped = class_rewards.to(torch.float64) - beta * (logp - ref)  # (K,) r − β log π/π_ref
        return class_advantages(logp, shaped, group_size, scale, eps)
    a = class_advantages(logp, class_rewards, group_size, scale, eps)  # (K,)
    if kl_mode == "k3":
        return a - beta * (1.0 - (ref - logp).exp())
    if kl_mode == "k3_ratio":
        kl = (logp.exp() * (logp - ref)).sum()
        return a - beta * (logp - ref - kl)
    raise ValueError(f"unknown kl_mode {kl_mode!r}; choose one of {', '.join(KL_MODES)}")


def _classes(ref_logprobs: torch.Tensor, rewards: torch.Tensor):
    """One prompt's reward classes: (class of each token (V,), class rewards (K,), class log π_ref (K,))."""
    class_rewards, members = torch.unique(rewards, return_inverse=True)  # (K,), (V,)
    ref = ref_logprobs.to(torch.float64)  # (V,)
    class_ref = torch.stack([torch.logsumexp(ref[members == k], 0) for k in range(class_rewards.numel())])  # (K,)
    return members, class_rewards, class_ref


def fixed_point_flow(
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    kl_mode: str,
    group_size: int,
    scale: bool = True,
    eps: float = 1e-4,
    steps: int = 20_000,
    lr: float = 0.5,
    decay: float = 0.0,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, float]:
    """One prompt's flow z ← z + lr/(1 + decay·t) · clip(ψ, −1, 1) from π_ref: (log π (V,) float64, final max |ψ|).

    ref_logprobs, rewards: (V,). Stops early once max |ψ| < tol. ``decay`` > 0 shrinks the step: needed for
    ``k1_reward`` with std scaling, whose ψ keeps size O(1) up to distance ~ε_std/β from π* (Â is a z-score of
    tiny reward differences), so a constant step circles π* instead of landing on it.
    """
    members, class_rewards, class_ref = _classes(ref_logprobs, rewards)
    z = class_ref.clone()  # (K,) start at π_ref
    for t in range(steps):
        logp = z - torch.logsumexp(z, 0)  # (K,)
        psi = update_direction(logp, class_ref, class_rewards, beta, kl_mode, group_size, scale, eps)  # (K,)
        if psi.abs().max() < tol:
            break
        z = z + lr / (1.0 + decay * t) * psi.clamp(-1.0, 1.0)
    logp = z - torch.logsumexp(z, 0)  # (K,)
    return ref_logprobs.to(torch.float64) + (logp - class_ref)[members], float(psi.abs().max())  # (V,)


def grpo_fixed_point(
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    kl_mode: str,
    group_size: int,
    scale: bool = True,
    eps: float = 1e-4,
    steps: int = 20_000,
    tol: float = 1e-7,
) -> torch.Tensor:
    """log π at the fixed point of GRPO's expected update, per prompt: (B, V) float32 (or (V,) for (V,) inputs).

    ``k1_reward``: π* = π_ref·exp(r/β)/Z in closed form (``lab.grpo``'s docstring proves it is the fixed point for
    any G and with or without std scaling; tests/test_grpo.py checks the flow lands there). ``k3``, ``k3_ratio``:
    the exact flow, which must settle (max |ψ| < tol) or this raises.
    """
    from lab.tasks.bandit import pi_star

    if not beta > 0:
        raise ValueError(f"beta must be > 0 for a KL fixed point, got {beta}")
    if kl_mode not in KL_MODES:
        raise ValueError(f"unknown kl_mode {kl_mode!r}; choose one of {', '.join(KL_MODES)}")
    if kl_mode == "k1_reward":
        return pi_star(ref_logprobs, rewards, beta)
    squeeze = ref_logprobs.dim() == 1
    rows = []
    for ref_row, reward_row in zip(
        ref_logprobs.reshape(-1, ref_logprobs.shape[-1]), rewards.reshape(-1, rewards.shape[-1])
    ):
        logp, residual = fixed_point_flow(ref_row, reward_row, beta, kl_mode, group_size, scale, eps, steps, tol=tol)
        if residual >= tol:
            raise RuntimeError(f"the {kl_mode} flow did not settle in {steps} steps (max |ψ| = {residual:.2e})")
        rows.append(logp.float())
    result = torch.stack(rows)  # (B, V)
    return result[0] if squeeze else result


@torch.no_grad()
def kl_to_fixed_point(model, tokenizer, task, fixed_logprobs: torch.Tensor) -> float:
    """Mean over the task's eval prompts of KL(π_fixed ‖ π_θ), exact over the vocabulary (like ``kl_to_optimum``).

    fixed_logprobs: (B, V), from ``grpo_fixed_point`` on the same prompts."""
    from lab.tasks.bandit import kl, next_token_logprobs

    logprobs = next_token_logprobs(model, tokenizer, task.eval_prompts())  # (B, V)
    return kl(fixed_logprobs.to(logprobs.device), logprobs).mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# The reward–KL frontier: what the KL-regularized objective can reach at each distance from π_ref

FRONTIER_BETAS = tuple(10 ** (-2 + 3.5 * i / 39) for i in range(40))  # β from 0.01 to 10^1.5, log-spaced


@torch.no_grad()
def reward_kl_frontier(
    ref_logprobs: torch.Tensor, rewards: torch.Tensor, betas: tuple[float, ...] = FRONTIER_BETAS
) -> list[dict]:
    """The exact frontier of max_π E_π[r] − β·KL(π ‖ π_ref) on an enumerable task, as β sweeps.

        π*_β = π_ref · exp(r/β) / Z                  (the optimum for each β, per prompt)
        point(β) = ( KL(π*_β ‖ π_ref),  E_{π*_β}[r] )  each averaged over the B prompts

    No policy of the same mean KL to π_ref has a higher mean reward than π*_β (the objective's optimum is unique),
    so a run's (kl/ref, reward) curve stays under this one. Small β: high reward, far from π_ref; β → ∞: the
    point (0, E_{π_ref}[r]).

    ref_logprobs, rewards: (B, V). Returns [{"beta", "kl", "reward"}], sorted by kl, with the π_ref point first.
    """
    from lab.tasks.enumerable import expected_reward, kl, pi_star

    ref = ref_logprobs.to(torch.float64)  # (B, V)
    r = rewards.to(torch.float64)  # (B, V)
    points = [{"beta": math.inf, "kl": 0.0, "reward": expected_reward(ref, r).mean().item()}]
    for beta in betas:
        star = pi_star(ref, r, beta)  # (B, V)
        points.append(
            {"beta": beta, "kl": kl(star, ref).mean().item(), "reward": expected_reward(star, r).mean().item()}
        )
    return sorted(points, key=lambda p: p["kl"])


@functools.lru_cache(maxsize=1)
def bandit_frontier() -> tuple[dict, ...]:
    """``reward_kl_frontier`` of the built-in bandit: its shipped π_ref on the 6 prompts (cached)."""
    from lab.tasks.bandit import PROMPTS, reward_tables
    from lab.tasks.base import load_builtin
    from lab.tasks.enumerable import next_token_logprobs

    model, tokenizer = load_builtin("bandit")
    ref_logprobs = next_token_logprobs(model, tokenizer, PROMPTS).cpu()  # (B, V)
    return tuple(reward_kl_frontier(ref_logprobs, reward_tables(PROMPTS, tokenizer)))
