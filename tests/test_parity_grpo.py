"""Parity with TRL's GRPOTrainer (trl 1.16) on the same tensors.

The loss: ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) only needs a handful of attributes and one
method from ``self`` — the per-token log-probs come from ``self._get_per_token_logps_and_entropies`` — so we call
the real function on a minimal stand-in object whose log-prob method returns our tensors. Everything it computes
afterwards (ratio, two-sided clip, k3 KL, the "grpo" / "bnpo" / "dapo" / "dr_grpo" normalizations, clip metrics)
is TRL's own code, and we compare losses, gradients and clip fractions to 1e-6.

The advantages: TRL computes them inside ``_generate_and_score_completions``, which needs a model, a tokenizer and
a generation backend, so it cannot be called on tensors. We reproduce its formula from the source (the
``multi_objective_aggregation == "sum_then_normalize"`` branch, with one reward function):
``mean_grouped_rewards = rewards.view(-1, G).nanmean(1)``, ``std_rewards = nanstd(rewards.view(-1, G), dim=1)``
(Bessel-corrected), ``advantages = (rewards − mean) / (std + 1e-4)`` when ``scale_rewards == "group"``, no division
when ``"none"``; ``nanstd`` is called from ``trl.trainer.utils`` itself.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

from lab.grpo import clipped_surrogate, group_advantages, grpo_loss  # noqa: E402

B, T, G = 6, 5, 3
MAX_LEN = 7


class _Accelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_self(loss_type: str, beta: float, eps_low: float, eps_high: float, logprobs, entropy):
    """The attributes of a GRPOTrainer that `_compute_loss` reads, and nothing else."""
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, entropy, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LEN,
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)  # (B, T)
    old = logprobs.detach() + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.28]
    ref = logprobs.detach() + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    mask[4, 4:] = 0
    advantages = torch.randn(B, generator=g)
    return logprobs, old, ref, mask, advantages


def _trl_loss(loss_type, beta, eps_low, eps_high, logprobs, old, ref, mask, advantages):
    fake = _trl_self(loss_type, beta, eps_low, eps_high, logprobs, torch.zeros(B, T))
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize(
    "loss_norm,loss_type", [("sequence", "grpo"), ("token", "dapo"), ("token", "bnpo"), ("constant", "dr_grpo")]
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_norm, loss_type, beta):
    """Loss value, gradient w.r.t. the log-probs, and clip fractions equal TRL's on the same tensors."""
    logprobs, old, ref, mask, advantages = _tensors()
    eps_low, eps_high = 0.2, 0.28
    ours, metrics = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        ref_logprobs=ref,
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        loss_norm=loss_norm,
        max_new_tokens=MAX_LEN,
    )
    (ours_grad,) = torch.autograd.grad(ours, logprobs)
    theirs, trl_metrics = _trl_loss(loss_type, beta, eps_low, eps_high, logprobs, old, ref, mask, advantages)
    (theirs_grad,) = torch.autograd.grad(theirs, logprobs)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-6
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=0)
    assert ours_grad.abs().sum() > 0
    assert abs(float(metrics["clip/low_frac"]) - trl_metrics["clip_ratio/low_mean"][0]) < 1e-6
    assert abs(float(metrics["clip/high_frac"]) - trl_metrics["clip_ratio/high_mean"][0]) < 1e-6
    assert abs(float(metrics["clip/frac"]) - trl_metrics["clip_ratio/region_mean"][0]) < 1e-6
    assert 0 < float(metrics["clip/frac"]) < 1  # the tensors do exercise the clip
    if beta > 0:
        assert abs(float(metrics["kl/ref"]) - trl_metrics["kl"][0]) < 1e-6


def test_clipped_surrogate_matches_trl_per_token():
    """Per-token surrogate: TRL's loss_type="dr_grpo" with max_completion_length=1 and a single token per row is
    exactly Σ_i ℓ_i / B, so comparing row by row (B = 1 each) compares ℓ itself."""
    logprobs, old, ref, mask, advantages = _tensors(1)
    per_token, _, _ = clipped_surrogate(logprobs, old, advantages, 0.2, 0.28)  # (B, T)
    for b in range(B):
        for t in range(T):
            one = torch.ones(1, 1, dtype=torch.long)
            fake = _trl_self("dr_grpo", 0.0, 0.2, 0.28, logprobs[b : b + 1, t : t + 1], torch.zeros(1, 1))
            fake.max_completion_length = 1
            inputs = {
                "prompt_ids": one,
                "prompt_mask": one,
                "completion_ids": one,
                "completion_mask": one,
                "advantages": advantages[b : b + 1],
                "old_per_token_logps": old[b : b + 1, t : t + 1],
            }
            theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
            assert abs(float(per_token[b, t].detach()) - float(theirs.detach())) < 1e-6


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_trl_formula(scale):
    """TRL: (r − group mean) / (nanstd(group) + 1e-4), or r − group mean with scale_rewards="none"."""
    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (4 * G,), generator=g).float() / 2  # ties and equal groups happen
    rewards[:G] = 0.5  # one group with zero std
    grouped = rewards.view(-1, G)
    mean = grouped.nanmean(dim=1).repeat_interleave(G)
    std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(G)
    expected = rewards - mean
    if scale:
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, G, eps=1e-4, scale=scale), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_norm,loss_type", [("sequence", "grpo"), ("token", "dapo"), ("constant", "dr_grpo")])
def test_k3_ratio_matches_trl_bias_corrected_kl(loss_norm, loss_type):
    """kl_mode k3_ratio = TRL's ``use_bias_correction_kl=True`` (its default in 1.16): per-token k3 times the
    undetached ratio π_θ/π_old. Loss and gradient equal TRL's, off-policy too (old ≠ logprobs here)."""
    logprobs, old, ref, mask, advantages = _tensors(2)
    ours, _ = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        ref_logprobs=ref,
        beta=0.04,
        kl_penalty="k3_ratio",
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_norm=loss_norm,
        max_new_tokens=MAX_LEN,
    )
    (ours_grad,) = torch.autograd.grad(ours, logprobs)
    fake = _trl_self(loss_type, 0.04, 0.2, 0.28, logprobs, torch.zeros(B, T))
    fake.args.use_bias_correction_kl = True
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    (theirs_grad,) = torch.autograd.grad(theirs, logprobs)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-6
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=0)
    plain, _ = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        ref_logprobs=ref,
        beta=0.04,
        kl_penalty="k3",
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_norm=loss_norm,
        max_new_tokens=MAX_LEN,
    )
    assert abs(float(plain.detach()) - float(ours.detach())) > 1e-6  # the ratio does change the loss off-policy
