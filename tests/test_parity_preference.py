"""Parity with TRL (trl 1.16, a test-only requirement): our preference losses equal TRL's on the same numbers.

We call TRL's own loss code, not a copy of it:

* DPO, length-normalized DPO and IPO: ``DPOTrainer._compute_loss`` (loss types ``sigmoid``, ``sigmoid_norm`` and
  ``ipo``), run on a minimal stand-in for the trainer and a stand-in model whose per-token log-probs sum to the
  sequence log-probs we give ours. TRL's ``sigmoid_norm`` is Tulu 3's length-normalized DPO; TRL's ``ipo`` divides
  the log-ratios by the completion length, and so does ``lab.dpo.ipo_loss``.
* SimPO: TRL 1.16's DPOTrainer has no SimPO loss; its SimPO lives in ``trl.experimental.cpo.CPOTrainer.cpo_loss``
  (``loss_type="simpo"``), which takes per-token average log-probs as we do.
* Conservative DPO (label smoothing ε): TRL 1.16's DPO ``sigmoid`` has no ε; CPOTrainer's ``sigmoid`` loss is
  −(1−ε) log σ(β z) − ε log σ(−β z) of its input margin z, so we feed it the DPO log-ratios.
* Bradley–Terry reward loss with centering: ``RewardTrainer.compute_loss`` (``center_rewards_coefficient``).
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

from lab.dpo import dpo_loss, ipo_loss, length_normalized_dpo_loss, simpo_loss  # noqa: E402
from lab.rm import reward_loss  # noqa: E402

B = 6


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model


def _numbers(seed=0):
    """Sequence log-probs of a policy and a reference for B pairs, and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 7, (B,), generator=g)
    rejected_lengths = torch.randint(1, 7, (B,), generator=g)
    logps = {
        k: -torch.rand(B, generator=g, dtype=torch.float64) * 3 * n
        for k, n in (
            ("chosen", chosen_lengths),
            ("rejected", rejected_lengths),
            ("ref_chosen", chosen_lengths),
            ("ref_rejected", rejected_lengths),
        )
    }
    return logps, chosen_lengths, rejected_lengths


def _trl_dpo(loss_type, beta, logps, chosen_lengths, rejected_lengths):
    """TRL's DPOTrainer._compute_loss on given sequence log-probs (a batch of [chosen..., rejected...])."""
    lengths = torch.cat([chosen_lengths, rejected_lengths])  # (2B,)
    L = int(lengths.max()) + 1  # one prompt token, then the completion
    positions = torch.arange(L)[None, :]  # (1, L)
    completion_mask = ((positions >= 1) & (positions <= lengths[:, None])).long()  # (2B, L)
    seq_logps = torch.cat([logps["chosen"], logps["rejected"]])  # (2B,)
    # per-token log-probs on the L-1 shifted positions: the completion's tokens share the sequence's log-prob
    per_token = completion_mask[:, 1:].double() * (seq_logps / lengths)[:, None]  # (2B, L-1)

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=torch.zeros_like(per_token, dtype=torch.bool)
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    inputs = {
        "input_ids": torch.zeros((2 * B, L), dtype=torch.long),
        "attention_mask": torch.ones((2 * B, L)),
        "completion_mask": completion_mask,
        "ref_chosen_logps": logps["ref_chosen"],
        "ref_rejected_logps": logps["ref_rejected"],
    }
    return trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _trl_cpo(loss_type, beta, chosen, rejected, gamma=0.0, label_smoothing=0.0):
    trainer = SimpleNamespace(
        alpha=0.0,
        accelerator=_Accelerator(),
        loss_type=loss_type,
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    losses, _, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    return losses.mean()


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_sigmoid_matches_trl(beta):
    logps, cl, rl = _numbers(1)
    ours, _ = dpo_loss(logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"], beta)
    assert abs(ours.item() - _trl_dpo("sigmoid", beta, logps, cl, rl).item()) < 1e-6


@pytest.mark.parametrize("beta", [0.5, 5.0])
def test_length_normalized_dpo_matches_trl_sigmoid_norm(beta):
    logps, cl, rl = _numbers(2)
    ours, _ = length_normalized_dpo_loss(
        logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"], cl, rl, beta
    )
    assert abs(ours.item() - _trl_dpo("sigmoid_norm", beta, logps, cl, rl).item()) < 1e-6


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_matches_trl(beta):
    logps, cl, rl = _numbers(3)
    ours, _ = ipo_loss(logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"], cl, rl, beta)
    assert abs(ours.item() - _trl_dpo("ipo", beta, logps, cl, rl).item()) < 1e-6


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.0, 0.2)])
def test_simpo_matches_trl_cpo(beta, gamma, eps):
    logps, cl, rl = _numbers(4)
    avg_chosen, avg_rejected = logps["chosen"] / cl, logps["rejected"] / rl
    ours, _ = simpo_loss(avg_chosen, avg_rejected, beta, gamma, label_smoothing=eps)
    theirs = _trl_cpo("simpo", beta, avg_chosen, avg_rejected, gamma=gamma, label_smoothing=eps)
    assert abs(ours.item() - theirs.item()) < 1e-6


def test_conservative_dpo_matches_trl_smoothed_sigmoid():
    logps, _, _ = _numbers(5)
    beta, eps = 0.3, 0.1
    ours, _ = dpo_loss(
        logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"], beta, label_smoothing=eps
    )
    theirs = _trl_cpo(
        "sigmoid",
        beta,
        logps["chosen"] - logps["ref_chosen"],
        logps["rejected"] - logps["ref_rejected"],
        label_smoothing=eps,
    )
    assert abs(ours.item() - theirs.item()) < 1e-6


@pytest.mark.parametrize("center", [None, 0.01, 0.5])
def test_reward_loss_matches_trl_reward_trainer(center):
    g = torch.Generator().manual_seed(6)
    chosen, rejected = (
        torch.randn(B, generator=g, dtype=torch.float64),
        torch.randn(B, generator=g, dtype=torch.float64),
    )
    logits = torch.cat([chosen, rejected])[:, None]  # (2B, 1): TRL's batch is [chosen..., rejected...]
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        args=SimpleNamespace(center_rewards_coefficient=center),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros((2 * B, 3), dtype=torch.long), "attention_mask": torch.ones((2 * B, 3))}
    theirs = RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=logits), inputs)
    ours, _ = reward_loss(chosen, rejected, center_weight=center or 0.0)
    assert abs(ours.item() - theirs.item()) < 1e-6
