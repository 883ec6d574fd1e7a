"""What the policy-gradient trainers share: no clip (ε = ∞), the ratio's spread and KL(π_θ‖π_old) over a reused
rollout, and the per-token sample rows of the step inspector."""

import math

import pytest
import torch

from lab.config import ConfigError
from lab.grpo import GRPOConfig, clipped_surrogate
from lab.onpolicy import RatioMeter, clip_bounds, kl_to_old
from lab.ppo import PPOConfig, ppo_policy_loss

INF = float("inf")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_without_clip_the_loss_is_minus_ratio_times_advantage():
    """ε = ∞, ratios 2, 0.25, 1.5 with A = +1, −1, +2:
    ℓ_t = −ρ_t A_t = −2, +0.25, −3      (PPO's token mean: −4.75/3 = −1.58333)
    ∂ℓ_t/∂log π_t = −ρ_t A_t (the same numbers): no token is clipped, although every ratio is outside [0.8, 1.2].
    """
    old = torch.full((1, 3), -1.0)
    ratio = torch.tensor([[2.0, 0.25, 1.5]])
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    logprobs = (old + ratio.log()).requires_grad_(True)
    per_token, low, high = clipped_surrogate(logprobs, old, advantages, INF, INF)
    torch.testing.assert_close(per_token, torch.tensor([[-2.0, 0.25, -3.0]]))
    assert not low.any() and not high.any()
    per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, 0.25, -3.0]]))

    logprobs = (old + ratio.log()).requires_grad_(True)
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, torch.ones(1, 3), INF, INF)
    torch.testing.assert_close(loss, torch.tensor(-4.75 / 3))
    assert float(metrics["clip/frac"]) == 0.0
    # with ε = 0.2 every token has left [0.8, 1.2] in the direction its advantage favours: all clipped, no gradient
    loss, clipped = ppo_policy_loss(logprobs, old, advantages, torch.ones(1, 3), 0.2, 0.2)
    assert float(clipped["clip/frac"]) == 1.0
    assert torch.autograd.grad(loss, logprobs)[0].abs().max() == 0


def test_clip_off_is_a_validated_config_option():
    assert clip_bounds(GRPOConfig(task="arith", clip=False)) == (INF, INF)
    assert clip_bounds(PPOConfig(task="arith", clip=False, epsilon_high=0.28)) == (INF, INF)
    assert clip_bounds(PPOConfig(task="arith", epsilon_high=0.28)) == (0.2, 0.28)
    for cls in (GRPOConfig, PPOConfig):
        with pytest.raises(ConfigError, match=r"^epsilon_low: must be in \[0, 1\) so the lower clip bound"):
            cls(task="arith", epsilon_low=1.5)
        with pytest.raises(ConfigError, match="^clip: must be true or false"):
            cls(task="arith", clip="no")


def test_ratio_meter_hand_computed():
    """Two microbatches; real tokens with ratios 1, 2 | 0.5 (a padded token of ratio e^5 is ignored):
    kl/old = mean(ρ ln ρ − (ρ − 1)) = (0 + (2 ln 2 − 1) + (0.5 ln 0.5 + 0.5)) / 3 = 0.179907
    ratio/mean = 3.5/3, max 2, min 0.5, std (population) = sqrt(((1/6)² + (5/6)² + (2/3)²)/3) = 0.623610
    """
    meter = RatioMeter()
    assert meter.metrics() == {}
    old = torch.zeros(1, 3)
    meter.add(torch.tensor([[0.0, math.log(2.0), 5.0]]), old, torch.tensor([[1, 1, 0]]))
    meter.add(torch.tensor([[math.log(0.5), 5.0, 5.0]]), old, torch.tensor([[1, 0, 0]]))
    out = {k: float(v) for k, v in meter.metrics().items()}
    assert out["kl/old"] == pytest.approx((2 * math.log(2) - 1 + 0.5 * math.log(0.5) + 0.5) / 3, rel=1e-5)
    assert out["ratio/mean"] == pytest.approx(3.5 / 3, rel=1e-6)
    assert out["ratio/max"] == pytest.approx(2.0) and out["ratio/min"] == pytest.approx(0.5)
    assert out["ratio/std"] == pytest.approx(math.sqrt(((1 / 6) ** 2 + (5 / 6) ** 2 + (2 / 3) ** 2) / 3), rel=1e-5)


def test_kl_to_old_is_kl_theta_old_in_expectation_over_old_samples():
    """Σ_y π_old(y)·[ρ ln ρ − (ρ − 1)] over a whole vocabulary equals KL(π_θ‖π_old) exactly, and each term is ≥ 0."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(7, generator=g).log_softmax(-1)  # (V,)
    new = (old + torch.randn(7, generator=g)).log_softmax(-1)  # (V,)
    weights = old.exp()  # π_old(y): the estimate's sampling distribution
    ratio = (new - old).exp()
    terms = ratio * (new - old) - (ratio - 1)
    exact = (new.exp() * (new - old)).sum()  # KL(π_θ ‖ π_old)
    torch.testing.assert_close((weights * terms).sum(), exact, atol=1e-6, rtol=1e-5)
    assert (terms >= 0).all()
    # kl_to_old is the token mean of those terms; with π_θ = π_old it is 0
    assert float(kl_to_old(new[None], old[None], torch.ones(1, 7))) == pytest.approx(float(terms.mean()), rel=1e-5)
    assert float(kl_to_old(old[None], old[None], torch.ones(1, 7))) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# The step inspector's sample rows


def _method_run(method, tmp_path):
    from lab.grpo import train as grpo_train
    from lab.ppo import train as ppo_train
    from lab.reinforce import ReinforceConfig
    from lab.reinforce import train as reinforce_train

    common = dict(task="arith", steps=1, eval_size=4, eval_every=0, out=str(tmp_path), run_id=method, lr=5e-2)
    if method == "grpo-process":  # per-token advantages; the rollout used once (ratio 1, old log-probs not stored)
        return grpo_train(GRPOConfig(**common, batch_size=4, group_size=4, reward_mode="process", kl_every=0, seed=1))
    if method == "grpo":  # β > 0 (π_ref computed), μ = 2 (old log-probs stored)
        return grpo_train(GRPOConfig(**common, batch_size=4, group_size=4, beta=0.1, num_iterations=2, seed=1))
    if method == "reinforce":
        return reinforce_train(ReinforceConfig(**common, batch_size=8, kl_every=0))
    return ppo_train(PPOConfig(**common, batch_size=4, num_minibatches=1, ppo_epochs=1))


@pytest.mark.parametrize("method", ["grpo-process", "grpo", "reinforce", "ppo"])
def test_sample_rows_hold_the_per_token_numbers_of_the_step(method, tmp_path):
    """Every logged row has the completion's tokens and, for each, π_old, π_θ after the update and the advantage
    (π_ref where the step computed it), all of the completion's length; the update moved some log-prob."""
    from lab.records import load_run

    list(_method_run(method, tmp_path))
    rows = load_run(tmp_path / method).samples
    assert rows
    ref_expected = method in ("grpo", "ppo")
    moved = 0.0
    for row in rows:
        length = len(row["tokens"])
        assert length >= 1 and "".join(row["tokens"]).startswith(row["completion"])
        for key in ("logprobs", "logprobs_after", "advantages") + (("ref_logprobs",) if ref_expected else ()):
            assert len(row[key]) == length, key
            assert all(math.isfinite(v) and (key == "advantages" or v <= 0) for v in row[key]), key
        assert ("ref_logprobs" in row) == ref_expected
        if method in ("grpo", "reinforce"):  # one advantage per completion, on every token
            assert row["advantages"] == pytest.approx([row["advantage"]] * length)
        if method == "ppo":
            assert len(row["values"]) == len(row["returns"]) == length
        moved = max(moved, max(abs(a - b) for a, b in zip(row["logprobs"], row["logprobs_after"])))
    assert moved > 1e-4
    if method == "grpo-process":  # the process advantage is a sum over the steps at or after the token: it varies
        assert any(len(set(row["advantages"])) > 1 for row in rows)
