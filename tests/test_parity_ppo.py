"""Parity of lab.ppo with TRL (1.16) on the same tensors, to 1e-6.

TRL 1.16 no longer ships a PPO trainer: ``PPOTrainer`` left ``trl`` for ``trl.experimental.ppo`` and is gone from
1.16 (its ``experimental`` package has no ``ppo`` module), and with it TRL's GAE, clipped value loss, whitening and
adaptive KL controller. What 1.16 still has is the same clipped surrogate inside ``GRPOTrainer._compute_loss``
(``loss_type="bnpo"``: token mean over the batch, the PPO reduction; per-token advantages of shape (B, T) are
accepted) and the k3 KL estimator it logs as ``kl``. So these tests check, against TRL's own code:

* ``ppo_policy_loss``: the loss, its gradient w.r.t. the log-probs, and ``clip/frac`` vs TRL's
  ``clip_ratio/region_mean``;
* ``shaped_rewards(..., estimator="k3")``: its per-token KL term vs TRL's ``kl`` metric.

GAE and the value loss have no TRL counterpart in 1.16; tests/test_ppo.py checks them against hand-computed values
and an O(T²) double sum instead.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lab.ops import masked_mean
from lab.ppo import ppo_policy_loss, shaped_rewards

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")


class _TRLStub:
    """Just enough of a GRPOTrainer for ``GRPOTrainer._compute_loss``: the model forward is replaced by fixed
    log-probs, and accelerate's collectives by identities (one process)."""

    def __init__(self, logps, epsilon, beta=0.0):
        self.logps = logps
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.importance_sampling_level = "token"
        self.loss_type = "bnpo"
        self.epsilon_low = self.epsilon_high = epsilon
        self.beta = beta
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False)
        self.use_vllm = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(reduce=lambda t, reduction: t, gather=lambda t: t, num_processes=1)
        self._metrics = defaultdict(lambda: defaultdict(list))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self.logps, torch.zeros_like(self.logps), None


def _trl_loss(logps, old_logps, advantages, mask, epsilon, beta=0.0, ref_logps=None):
    stub = _TRLStub(logps, epsilon, beta)
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
    }
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = grpo_trainer.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    # ratios spread around 1, mostly moved the way the advantage asks, so both branches of the min occur
    logps = old + 0.3 * advantages + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in (6, 3, 1, 5)])
    return logps, old, advantages, mask


@pytest.mark.parametrize("seed,epsilon", [(0, 0.2), (1, 0.1), (2, 0.3)])
def test_policy_loss_gradient_and_clip_fraction_match_trl(seed, epsilon):
    logps, old, advantages, mask = _tensors(seed)
    ours_logps = logps.clone().requires_grad_(True)
    trl_logps = logps.clone().requires_grad_(True)
    loss, metrics = ppo_policy_loss(ours_logps, old, advantages, mask, epsilon, epsilon)
    trl_loss, trl_metrics = _trl_loss(trl_logps, old, advantages, mask, epsilon)
    loss.backward()
    trl_loss.backward()
    assert float(metrics["clip/frac"]) > 0  # the case exercises clipping
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=0)
    assert float(metrics["clip/frac"]) == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)


def test_k3_kl_in_shaped_rewards_matches_trl():
    """At ratio 1 TRL's loss adds β·k3(π_θ, π_ref); its logged ``kl`` is the token mean of k3, which must equal the
    token mean of our per-token KL term −(r_t − score·[last])/β."""
    logps, _, advantages, mask = _tensors(3)
    g = torch.Generator().manual_seed(4)
    ref = logps - 0.5 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    beta = 0.2
    _, trl_metrics = _trl_loss(logps.clone(), logps.clone(), advantages, mask, 0.2, beta=beta, ref_logps=ref)
    rewards = shaped_rewards(torch.zeros(4, dtype=torch.float64), logps, ref, mask, beta, estimator="k3")
    ours = masked_mean(-rewards.double() / beta, mask)
    assert float(ours) == pytest.approx(trl_metrics["kl"][0], abs=1e-6)
