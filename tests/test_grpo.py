"""GRPO: hand-computed advantages and clipping, identities, the bandit optimum, and short runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.config import ConfigError
from lab.grpo import (
    LOSS_NORMS,
    GRPOConfig,
    clipped_surrogate,
    constant_norm,
    group_advantages,
    grpo_loss,
    sequence_mean,
    token_mean,
)
from lab.reinforce import reinforce_loss

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread beats two, by far on a busy machine (barriers wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    torch.testing.assert_close(
        group_advantages(rewards, 4, eps=0.1, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )


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
        part, _ = grpo_loss(
            logprobs[rows],
            old[rows],
            adv[rows],
            mask[rows],
            ref_logprobs=ref[rows],
            num_sequences=6,
            num_tokens=int(mask.sum()),
            **kw,
        )
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
# the KL to π_ref: what each kl_mode's gradient is, and where each settles


def _softmax_case(seed=0, V=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)  # free logits of a one-token policy
    ref = torch.randn(V, generator=g, dtype=torch.float64).log_softmax(-1)  # (V,)
    return z, ref


def test_k3_penalty_gradient_is_reverse_kl_and_k3_ratio_is_forward_kl():
    """Expected on-policy gradients, exact over a 5-token softmax (the sampling distribution is not differentiated,
    old = logprobs.detach() so ρ = 1): E_π[∇k3] = ∇KL(π_ref ‖ π) = π − π_ref, E_π[∇(ρ·k3)] = ∇KL(π ‖ π_ref)."""
    from lab.grpo import k3_penalty, k3_ratio_penalty

    z, ref = _softmax_case()
    logp = z.log_softmax(-1)  # (V,)
    weights = logp.exp().detach()  # π(y), a constant: tokens are sampled, not differentiated

    def expected_grad(penalty):
        (grad,) = torch.autograd.grad((weights * penalty(logp, logp.detach(), ref)).sum(), z, retain_graph=True)
        return grad

    (reverse,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), z, retain_graph=True)  # ∇KL(π_ref ‖ π)
    (forward,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), z, retain_graph=True)  # ∇KL(π ‖ π_ref)
    torch.testing.assert_close(expected_grad(k3_penalty), reverse)
    torch.testing.assert_close(reverse, (logp.exp() - ref.exp()).detach())
    torch.testing.assert_close(expected_grad(k3_ratio_penalty), forward)
    # same values on-policy: ρ = 1
    torch.testing.assert_close(k3_ratio_penalty(logp, logp.detach(), ref), k3_penalty(logp, logp.detach(), ref))


def test_kl_reward_hand_computed():
    """β = 0.5, r = (1, 0); log π_old − log π_ref per token: row 0 (0.2, 0.4, padding 9) → 0.6, row 1 (−0.2) → −0.2:
    r' = (1 − 0.3, 0 + 0.1) = (0.7, 0.1)."""
    from lab.grpo import kl_reward

    old = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.2, -1.4, -9.0], [-1.8, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(kl_reward(torch.tensor([1.0, 0.0]), old, ref, mask, 0.5), torch.tensor([0.7, 0.1]))


def test_exact_group_advantages_hand_computed_and_against_sampling():
    """p = (½, ½), r = (1, 0), G = 2. Groups: {1,1} (¼) and {0,0} (¼) have Â = 0; {1,0} (½) has Â = ±½ unscaled,
    ±½/std = ±½/√½ = ±0.707107 scaled (ε = 0). a_0 = E[n_0 Â_0]/(G p_0) = ½·Â/1: 0.25 and 0.353553.
    Unscaled, a = (G − 1)/G · (r − E_p r) for any p and G; scaled, it matches the mean over sampled groups."""
    from lab.fixed_points import class_advantages

    half = torch.tensor([0.5, 0.5]).log()
    r = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        class_advantages(half, r, 2, False, 0.0), torch.tensor([0.25, -0.25], dtype=torch.float64)
    )
    torch.testing.assert_close(
        class_advantages(half, r, 2, True, 0.0),
        torch.tensor([0.353553, -0.353553], dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    r = torch.tensor([1.0, 0.5, 0.2, -1.0])
    torch.testing.assert_close(class_advantages(p.log(), r, 8, False, 1e-4), (7 / 8 * (r - (p * r).sum())).double())
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000 * 4, replacement=True, generator=g)  # (N·G,) groups of 4, contiguous
    adv = group_advantages(r[samples], 4, eps=1e-4)  # (N·G,)
    sampled = torch.stack([adv[samples == k].sum() for k in range(4)]) / (samples.numel() * p)  # E[n_k Â_k]/(G p_k)
    torch.testing.assert_close(class_advantages(p.log(), r, 4, True, 1e-4).float(), sampled, atol=0.01, rtol=0)


@pytest.mark.parametrize("scale", [True, False])
def test_k1_reward_fixed_point_is_pi_star_and_the_k3_ones_are_not(scale):
    """The exact expected update (lab.fixed_points) on a bandit-like prompt, G = 8, β = 0.5: with k1_reward it is
    exactly 0 at π* and the flow from π_ref lands on π*; k3 and k3_ratio settle elsewhere, except that k3_ratio
    without std scaling is π* at β·G/(G − 1) (the group mean includes the sample, which scales Â by (G − 1)/G)."""
    from lab.fixed_points import fixed_point_flow, grpo_fixed_point, update_direction
    from lab.tasks.bandit import kl, pi_star

    beta, G = 0.5, 8
    ref = torch.tensor([0.45, 0.25, 0.2, 0.1, 0.001]).log()  # (V,) the last token: a non-answer
    ref = ref - ref.logsumexp(0)
    r = torch.tensor([0.0, 0.5, 0.25, 1.0, -1.0])
    star = pi_star(ref, r, beta).double()  # (V,)
    assert update_direction(star, ref, r, beta, "k1_reward", G, scale, 1e-4).abs().max() < 1e-9
    assert update_direction(ref.double(), ref, r, beta, "k1_reward", G, scale, 1e-4).abs().max() > 0.01
    flow, _ = fixed_point_flow(ref, r, beta, "k1_reward", G, scale, decay=0.05)  # a shrinking step: see its docstring
    assert kl(star[None], flow[None]).item() < 1e-6
    start = kl(star[None], ref[None].double()).item()
    for mode in ("k3", "k3_ratio"):
        fixed = grpo_fixed_point(ref, r, beta, mode, G, scale).double()  # (V,)
        assert update_direction(fixed, ref, r, beta, mode, G, scale, 1e-4).abs().max() < 1e-5  # float32 result
        assert kl(star[None], fixed[None]).item() > 0.005 * start, mode
    if not scale:
        fixed = grpo_fixed_point(ref, r, beta, "k3_ratio", G, scale=False)
        torch.testing.assert_close(fixed, pi_star(ref, r, beta * G / (G - 1)), atol=1e-5, rtol=0)


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
    with pytest.raises(ConfigError, match="kl_mode: must be one of k1_reward, k3, k3_ratio"):
        GRPOConfig(kl_mode="k2")
    assert GRPOConfig().kl_mode == "k1_reward"  # the choice whose fixed point is π*
    # bandit's own defaults (see GRPOConfig.mode); elsewhere the usual ones, and a given value always wins
    assert (GRPOConfig(task="bandit").mode, GRPOConfig(task="bandit").batch_size) == ("full", 12)
    assert (GRPOConfig().mode, GRPOConfig().batch_size) == ("lora", 8)
    assert GRPOConfig(task="bandit", mode="lora", batch_size=6).mode == "lora"


# ----------------------------------------------------------------------------------------------------------------------
# the closed-form optimum on `bandit`


def _bandit_run(tmp_path, **changes):
    """A GRPO run on bandit with its config defaults plus ``changes``: (history, start and end KL(π*‖π_θ), the
    fixed point's log-probs, KL(fixed ‖ π_θ) at the start)."""
    from lab.fixed_points import kl_to_fixed_point
    from lab.grpo import bandit_fixed_point, train
    from lab.runner import load_for
    from lab.tasks import get_task
    from lab.tasks.bandit import kl_to_optimum, next_token_logprobs

    task = get_task("bandit")
    cfg = GRPOConfig(task="bandit", sample_every=0, out=str(tmp_path), **changes)
    policy = load_for(cfg, task)
    with torch.no_grad(), policy.reference() as ref:
        ref_logprobs = next_token_logprobs(ref, policy.tokenizer, task.eval_prompts())  # (6, V)
    fixed = bandit_fixed_point(cfg, policy, task, ref_logprobs)  # (6, V)
    start = kl_to_optimum(policy.model, policy.tokenizer, cfg.beta, ref_logprobs)
    fixed_start = kl_to_fixed_point(policy.model, policy.tokenizer, task, fixed)
    history = list(train(cfg, policy=policy))
    end = kl_to_optimum(policy.model, policy.tokenizer, cfg.beta, ref_logprobs)
    return history, start, end, fixed, fixed_start


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_grpo_default_reaches_the_bandit_optimum(tmp_path, beta):
    """With its defaults on bandit (kl_mode k1_reward, std scaling on, G = 8, 12 prompts a step, full fine-tuning,
    lr 1e-3, 60 steps) GRPO ends with KL(π* ‖ π_θ) ≤ 10% of KL(π* ‖ π_ref), at β = 0.1 and at β = 0.5.

    Measured with seeds 0–3: 0.3–0.5% at β = 0.1 (start 1.94 nats), 0.6–0.7% at β = 0.5 (start 0.28), 3–6 s each.
    The logged ``eval/kl_to_optimum`` is the same KL, and ``eval/kl_to_fixed_point`` too: k1_reward's fixed point
    is π* itself.
    """
    history, start, end, _, _ = _bandit_run(tmp_path, beta=beta)
    assert start > 0.2
    assert end <= 0.1 * start, f"KL(π*‖π_θ) went from {start:.4f} to {end:.4f}"
    last = history[-1]
    assert last["eval/kl_to_optimum"] == pytest.approx(end, rel=1e-4)
    assert last["eval/kl_to_fixed_point"] == pytest.approx(end, rel=1e-3)
    assert last["kl/ref"] > 0 and "reward/shaped" in last


def test_grpo_k3_converges_to_its_own_fixed_point_not_to_pi_star(tmp_path):
    """DeepSeekMath's β·k3 in the loss at β = 0.5 (bandit defaults otherwise): the policy lands on the exact fixed
    point of that update (lab.fixed_points), which with std scaling is farther from π* than π_ref is.
    Measured, seed 0: KL(fixed ‖ π_θ) 1.15 → 0.006; KL(π* ‖ π_θ) 0.28 → 0.45 (the fixed point itself is at 0.42)."""
    from lab.tasks.bandit import kl

    history, start, end, fixed, fixed_start = _bandit_run(tmp_path, beta=0.5, kl_mode="k3")
    last = history[-1]
    assert last["eval/kl_to_fixed_point"] <= 0.05 * fixed_start
    assert end > start  # moved away from π*: the k3 gradient is that of KL(π_ref ‖ π_θ)
    assert last["eval/kl_to_optimum"] == pytest.approx(end, rel=1e-4)
    assert fixed.shape[0] == 6 and kl(fixed, fixed).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# runs


def _params(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def test_a_few_grpo_steps_on_arith_change_parameters_and_write_the_record(tmp_path):
    """Two steps, μ = 2, with two minibatches of two microbatches each: the adapter moves, the record holds every
    metric the glossary lists, and β = 0 with kl_every = 0 never touches the reference model."""
    from lab.grpo import train
    from lab.records import load_run
    from lab.runner import load_for
    from lab.tasks import get_task

    cfg = GRPOConfig(
        task="arith",
        steps=2,
        batch_size=4,
        group_size=4,
        num_iterations=2,
        minibatch_size=8,
        microbatch_size=4,
        eval_every=2,
        eval_size=8,
        out=str(tmp_path),
        run_id="g",
        lr=1e-2,
        kl_every=0,
    )
    policy = load_for(cfg, get_task("arith"))
    before = _params(policy)

    def no_reference():
        raise AssertionError("β = 0 and kl_every = 0 must not compute the reference")

    policy.reference = no_reference
    history = list(train(cfg, policy=policy))
    after = _params(policy)
    assert min(m["groups/zero_std_frac"] for m in history) < 1  # some group disagreed, so there was a gradient
    assert any(not torch.equal(before[n], after[n]) for n in before)
    last = history[-1]
    for key in (
        "reward/mean",
        "reward/std",
        "groups/zero_std_frac",
        "entropy",
        "clip/low_frac",
        "clip/high_frac",
        "clip/frac",
        "loss/policy",
        "grad/norm",
        "completion/length",
        "eval/accuracy",
    ):
        assert key in last, key
    assert "kl/ref" not in last
    assert 0 <= last["clip/frac"] <= 1 and last["entropy"] > 0
    assert any(k in last for k in ("length/correct", "length/incorrect"))
    run = load_run(tmp_path / "g")
    assert run.status["status"] == "completed"
    assert [m["step"] for m in run.metrics] == [1, 2]
    assert run.samples and {"prompt", "completion", "reward", "advantage"} <= set(run.samples[0])
    assert "eval/accuracy" in run.status["summary"]["before"]


def test_cli_run(tmp_path):
    """`python -m lab train grpo` runs in a subprocess and writes the record."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "lab",
        "train",
        "grpo",
        "--task",
        "arith",
        "--steps",
        "2",
        "--group-size",
        "4",
        "--batch-size",
        "2",
        "--eval-size",
        "4",
        "--out",
        str(tmp_path),
        "--run-id",
        "cli",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--group-size", "1"], "group_size: must be ≥ 2 so the group has a baseline"),
        (["--epsilon-low", "2"], "epsilon_low: must be in [0, 1)"),
        (["--loss-norm", "mean"], "loss_norm: must be one of"),
    ],
)
def test_cli_bad_hyperparameters_give_one_line(flags, words, capsys, tmp_path):
    """The CLI's entry point (what `python -m lab` runs) stops before loading anything: exit code 2, one line."""
    from lab.cli import main

    assert main(["train", "grpo", "--task", "arith", "--out", str(tmp_path)] + flags) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not any(tmp_path.iterdir())  # no run record for a run that never started


@pytest.mark.parametrize("changes", [{}, {"num_iterations": 2, "minibatch_size": 8, "microbatch_size": 4}])
def test_grpo_at_beta_0_logs_kl_ref_every_step_by_default(tmp_path, changes):
    """β = 0 with the default kl_every = 1: every step logs kl/ref, the k3 token mean of π_old against π_ref over
    the step's samples (what kl_mode k1_reward logs at β > 0). It is taken before the step's update, so with a fresh
    LoRA adapter (B = 0: π_θ = π_ref) it is 0 at step 1, and positive once the adapter has moved. With a reused
    rollout (μ = 2, two minibatches) the stored π_old gives the same quantity."""
    from lab.grpo import train
    from lab.runner import load_for
    from lab.tasks import get_task

    cfg = GRPOConfig(
        task="arith",
        steps=3,
        batch_size=4,
        group_size=4,
        eval_every=0,
        eval_size=4,
        sample_every=0,
        out=str(tmp_path),
        run_id="k",
        lr=3e-2,
        **changes,
    )
    assert cfg.beta == 0 and cfg.kl_every == 1
    history = list(train(cfg, policy=load_for(cfg, get_task("arith"))))
    assert all("kl/ref" in m for m in history)
    assert history[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["kl/ref"] > 1e-6
    assert "reward/shaped" not in history[-1]  # β = 0: the KL is watched, not optimized


def test_grpo_kl_every_logs_kl_ref_on_step_1_and_every_nth_step(tmp_path):
    """kl_every = 2 over 3 steps: kl/ref at steps 1 and 3, not 2 (lab.rollout.kl_due)."""
    from lab.grpo import train
    from lab.rollout import kl_due
    from lab.runner import load_for
    from lab.tasks import get_task

    assert [s for s in range(1, 8) if kl_due(s, 3)] == [1, 4, 7] and not any(kl_due(s, 0) for s in range(1, 8))
    cfg = GRPOConfig(
        task="arith",
        steps=3,
        batch_size=2,
        group_size=2,
        eval_every=0,
        eval_size=4,
        sample_every=0,
        out=str(tmp_path),
        run_id="k2",
        kl_every=2,
    )
    history = list(train(cfg, policy=load_for(cfg, get_task("arith"))))
    assert ["kl/ref" in m for m in history] == [True, False, True]
