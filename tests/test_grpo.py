"""GRPO: hand-computed advantages and clipping, identities, the bandit optimum, and short runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.config import ConfigError
from lab.grpo import (LOSS_NORMS, GRPOConfig, clipped_surrogate, constant_norm, group_advantages, grpo_loss,
                      sequence_mean, token_mean)
from lab.reinforce import reinforce_loss

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_computed():
    """Group [1, 0, 0, 0], ε = 0: mean 0.25, deviations (0.75, −0.25, −0.25, −0.25),
    unbiased var = (0.5625 + 3·0.0625) / 3 = 0.25, std 0.5 → Â = (1.5, −0.5, −0.5, −0.5).
    Group [1, 0, 0, 1], ε = 0.1: mean 0.5, std = sqrt(4·0.25 / 3) = 0.577350, Â = ±0.5 / 0.677350 = ±0.738170.
    Group [0, 0, 0, 0]: Â = 0 (nothing to learn from a group that all agrees)."""
    rewards = torch.tensor([1.0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.0), torch.tensor([1.5, -0.5, -0.5, -0.5]))
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])
    expected = torch.tensor([0.738170, -0.738170, -0.738170, 0.738170, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.1), expected, atol=1e-6, rtol=0)
    # Dr. GRPO: no division, only the group mean comes off
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.1, scale=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_group_advantages_zero_mean_unit_std_per_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 6, generator=g)
    adv = group_advantages(rewards, 6, eps=0.0).view(5, 6)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(-1), torch.ones(5), atol=1e-5, rtol=0)
    unscaled = group_advantages(rewards, 6, scale=False).view(5, 6)
    torch.testing.assert_close(unscaled.mean(-1), torch.zeros(5), atol=1e-6, rtol=0)
    # groups are contiguous rows: shuffling inside a group permutes its advantages the same way
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    torch.testing.assert_close(group_advantages(rewards[:6][perm], 6), group_advantages(rewards[:6], 6)[perm])
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


# ----------------------------------------------------------------------------------------------------------------------
# the clipped surrogate


def test_clipped_surrogate_hand_computed():
    """ε_low = ε_high = 0.2:
    ρ = 1.5, Â = +1: min(1.5, 1.2) = 1.2 → ℓ = −1.2, clipped high, no gradient;
    ρ = 0.5, Â = −1: min(−0.5, −0.8) = −0.8 → ℓ = 0.8, clipped low, no gradient;
    ρ = 0.5, Â = +1: min(0.5, 0.8) = 0.5 → ℓ = −0.5, not clipped, dℓ/dlogπ = −ρÂ = −0.5;
    ρ = 1.5, Â = −1: min(−1.5, −1.2) = −1.5 → ℓ = 1.5, not clipped, dℓ/dlogπ = −ρÂ = 1.5."""
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    logprobs = ratios.log().requires_grad_(True)
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, low, high = clipped_surrogate(logprobs, old, adv, 0.2, 0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.2], [0.8], [-0.5], [1.5]]))
    assert low.squeeze(-1).tolist() == [False, True, False, False]
    assert high.squeeze(-1).tolist() == [True, False, False, False]
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [0.0], [-0.5], [1.5]]))


def test_asymmetric_clip_bounds():
    """DAPO's clip-higher: ε_high = 0.28 lets ρ = 1.25 through for Â > 0 where ε = 0.2 would clip it."""
    logprobs = torch.tensor([[1.25]]).log()
    _, _, high = clipped_surrogate(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.2)
    assert high.item()
    _, _, high = clipped_surrogate(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    assert not high.item()


def test_ratio_one_gradient_equals_reinforce_gradient():
    """At ρ = 1 (old = logprobs.detach()) nothing is clipped and −min(ρÂ, clip(ρ)Â) has gradient −Â ∇log π, so
    Σ_t ℓ_t / B has exactly the gradient of the REINFORCE loss −(1/B) Σ_b Â_b Σ_t log π_bt (autograd, same tensors)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g, requires_grad=True)  # (B, T, V) stand-in for a model
    ids = torch.randint(0, 7, (4, 5), generator=g)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    advantages = torch.randn(4, generator=g)

    def logprobs_of(x):
        return x.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, T)

    logprobs = logprobs_of(logits)
    per_token, low, high = clipped_surrogate(logprobs, logprobs.detach(), advantages, 0.2, 0.2)
    assert not (low | high).any()
    (grad_ppo,) = torch.autograd.grad((per_token * mask).sum() / 4, logits)
    loss_pg, _ = reinforce_loss(logprobs_of(logits), advantages, mask)
    (grad_pg,) = torch.autograd.grad(loss_pg, logits)
    torch.testing.assert_close(grad_ppo, grad_pg, atol=1e-6, rtol=0)
    assert grad_pg.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# normalizations


def test_loss_norms_hand_computed():
    """ℓ = [[1, 2, 3], [4, 5, 6]], mask [[1, 1, 0], [1, 1, 1]], T_max = 4:
    sequence: ((1+2)/2 + (4+5+6)/3) / 2 = (1.5 + 5) / 2 = 3.25
    token:    (1+2+4+5+6) / 5 = 18 / 5 = 3.6
    constant: 18 / (2 · 4) = 2.25"""
    per_token = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    assert sequence_mean(per_token, mask).item() == pytest.approx(3.25)
    assert token_mean(per_token, mask).item() == pytest.approx(3.6)
    assert constant_norm(per_token, mask, max_new_tokens=4).item() == pytest.approx(2.25)
    assert set(LOSS_NORMS) == {"sequence", "token", "constant"}


@pytest.mark.parametrize("loss_norm", ["sequence", "token", "constant"])
def test_microbatches_accumulate_to_the_minibatch_gradient(loss_norm):
    """Splitting a minibatch into microbatches and passing the minibatch's totals gives the same gradient."""
    g = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(6, 4, generator=g)).requires_grad_(True)
    old = logprobs.detach() + 0.2 * torch.randn(6, 4, generator=g)
    ref = logprobs.detach() + 0.2 * torch.randn(6, 4, generator=g)
    mask = (torch.rand(6, 4, generator=g) > 0.3).float()
    mask[:, 0] = 1
    adv = torch.randn(6, generator=g)
    kw = dict(beta=0.1, loss_norm=loss_norm, max_new_tokens=4)
    full, _ = grpo_loss(logprobs, old, adv, mask, ref_logprobs=ref, **kw)
    (grad_full,) = torch.autograd.grad(full, logprobs)
    total = 0
    for rows in (slice(0, 2), slice(2, 6)):
        part, _ = grpo_loss(logprobs[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows],
                            num_sequences=6, num_tokens=int(mask.sum()), **kw)
        total = total + part
    (grad_parts,) = torch.autograd.grad(total, logprobs)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(grad_parts, grad_full)


def test_grpo_loss_kl_term_and_metrics():
    """β·k3 is added per token: with Â = 0 and ρ = 1 the loss is β · mean k3. For log π − log π_ref = 0.5 on
    every token: k3 = e^{−0.5} + 0.5 − 1 = 0.106531, β = 0.5 → loss 0.053265."""
    logprobs = torch.full((2, 3), -1.0)
    ref = torch.full((2, 3), -1.5)
    mask = torch.ones(2, 3)
    loss, metrics = grpo_loss(logprobs, logprobs, torch.zeros(2), mask, ref_logprobs=ref, beta=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.106531, abs=1e-6)
    assert metrics["kl/ref"].item() == pytest.approx(0.106531, abs=1e-6)
    assert metrics["clip/frac"].item() == 0.0
    _, metrics = grpo_loss(logprobs, logprobs, torch.zeros(2), mask)
    assert "kl/ref" not in metrics  # β = 0: nothing about the reference


# ----------------------------------------------------------------------------------------------------------------------
# config


def test_config_errors_name_field_and_range():
    with pytest.raises(ConfigError, match=r"group_size: must be ≥ 2 so the group has a baseline, got 1"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match=r"epsilon_low: must be in \[0, 1\)"):
        GRPOConfig(epsilon_low=2)
    with pytest.raises(ConfigError, match="loss_norm"):
        GRPOConfig(loss_norm="median")
    with pytest.raises(ConfigError, match="minibatch_size: must divide"):
        GRPOConfig(batch_size=2, group_size=4, minibatch_size=3)
    assert GRPOConfig(loss_norm="constant").scale_rewards is False  # Dr. GRPO drops the std division
    assert GRPOConfig().scale_rewards is True
