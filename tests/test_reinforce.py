"""REINFORCE: the loss by hand, the baselines, the KL-penalized reward, and short runs."""

import json
from pathlib import Path

import pytest
import torch

from lab.config import ConfigError
from lab.reinforce import ReinforceConfig, batch_baseline, ema_baseline, kl_penalized_rewards, reinforce_loss


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread beats two, by far on a busy machine (barriers wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reinforce_loss_hand_computed():
    """logprobs [[−1, −2, −9], [−0.5, −0.5, −0.5]], mask [[1, 1, 0], [1, 1, 1]] → log π(y|x) = (−3, −1.5);
    advantages (2, −1): L = −((2·−3) + (−1·−1.5)) / 2 = −(−6 + 1.5) / 2 = 2.25.
    dL/dlogπ_bt = −A_b m_bt / B: row 0 → −1 (masked token 0), row 1 → +0.5."""
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    loss, metrics = reinforce_loss(logprobs, torch.tensor([2.0, -1.0]), mask)
    assert loss.item() == pytest.approx(2.25)
    assert metrics["loss/policy"].item() == pytest.approx(2.25)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]]))


def test_advantages_carry_no_gradient():
    """The reward weights the score function; it is not differentiated (it may even be computed from logprobs)."""
    logprobs = torch.tensor([[-1.0]], requires_grad=True)
    advantages = logprobs.sum(-1) * 3  # depends on logprobs, must be treated as a constant
    loss, _ = reinforce_loss(logprobs, advantages, torch.ones(1, 1))
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert grad.item() == pytest.approx(3.0)  # −A = 3; differentiating A too would give 6


def test_baselines():
    """batch: the mean. ema with d = 0.9: first step uses the batch mean (2.0) and stores it; second batch mean 4.0
    is compared against b = 2.0 (not its own mean), then b ← 0.9·2 + 0.1·4 = 2.2."""
    assert batch_baseline(torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(3.0)
    now, nxt = ema_baseline(None, torch.tensor([1.0, 3.0]), 0.9)
    assert (now, nxt) == (pytest.approx(2.0), pytest.approx(2.0))
    now, nxt = ema_baseline(nxt, torch.tensor([4.0, 4.0]), 0.9)
    assert (now, nxt) == (pytest.approx(2.0), pytest.approx(2.2))


def test_kl_penalized_rewards_hand_computed():
    """R = r − β Σ_t m_t (log π − log π_ref): r = 1, log-ratios (0.5, 0.25, 9 masked), β = 0.2 → 1 − 0.2·0.75 = 0.85."""
    logprobs = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.25, -10.0]])
    out = kl_penalized_rewards(torch.tensor([1.0]), logprobs, ref, torch.tensor([[1.0, 1.0, 0.0]]), beta=0.2)
    assert out.item() == pytest.approx(0.85)


def test_baseline_reduces_gradient_variance_on_a_toy_bandit():
    """A 4-armed softmax bandit, rewards (1, 1, 1, 0) + 10 (all large and positive): without a baseline every
    sample pushes up its own arm and the estimate is noisy; subtracting the batch mean keeps the same expected
    direction with far less variance. Exact expected gradient: ∂/∂z_k E[r] = π_k (r_k − E r)."""
    torch.manual_seed(0)
    z = torch.zeros(4)
    r = torch.tensor([1.0, 1.0, 1.0, 0.0]) + 10
    probs = z.softmax(-1)
    exact = probs * (r - (probs * r).sum())

    def estimates(baseline: bool, n: int = 400, batch: int = 16):
        grads = []
        for _ in range(n):
            logits = z.clone().requires_grad_(True)
            arms = torch.multinomial(probs, batch, replacement=True)
            logprobs = logits.log_softmax(-1)[arms][:, None]  # (B, 1)
            rewards = r[arms]
            adv = rewards - batch_baseline(rewards) if baseline else rewards
            loss, _ = reinforce_loss(logprobs, adv, torch.ones(batch, 1))
            (g,) = torch.autograd.grad(-loss, logits)
            grads.append(g)
        return torch.stack(grads)

    plain, based = estimates(False), estimates(True)
    var_plain = (plain - exact).pow(2).sum(-1).mean()
    var_based = (based - exact * (1 - 1 / 16)).pow(2).sum(-1).mean()  # batch mean includes the sample: × (1 − 1/B)
    assert var_based < var_plain / 20
    torch.testing.assert_close(plain.mean(0), exact, atol=0.15, rtol=0)  # unbiased, within sampling noise
    torch.testing.assert_close(based.mean(0), exact * (1 - 1 / 16), atol=0.02, rtol=0)


def test_config_errors():
    with pytest.raises(ConfigError, match="baseline: must be one of none, batch, ema"):
        ReinforceConfig(baseline="median")
    with pytest.raises(ConfigError, match=r"beta: must be in \[0.0, 100.0\], got -1"):
        ReinforceConfig(beta=-1)


# ----------------------------------------------------------------------------------------------------------------------
# runs


def test_reinforce_raises_the_exact_expected_reward_on_bandit(tmp_path):
    """Sanity: 15 steps of REINFORCE with the batch baseline raise E_{y~π_θ}[r] over the bandit's six prompts
    (computed exactly from the next-token distribution, no sampling). π_ref puts most mass on poor answers
    (expected reward 0.32); measured with seeds 0–2: 0.78–0.79 after 15 steps. We ask for + 0.25."""
    from lab.evaluate import bandit_exact
    from lab.reinforce import train
    from lab.runner import load_for
    from lab.tasks import get_task

    task = get_task("bandit")
    cfg = ReinforceConfig(
        task="bandit",
        mode="full",
        lr=1e-3,
        steps=15,
        batch_size=48,
        baseline="batch",
        eval_every=0,
        sample_every=0,
        out=str(tmp_path),
    )
    policy = load_for(cfg, task)
    with torch.no_grad():
        start = bandit_exact(policy.model, policy.tokenizer, task)["exact_reward"]
    history = list(train(cfg, policy=policy))
    with torch.no_grad():
        end = bandit_exact(policy.model, policy.tokenizer, task)["exact_reward"]
    assert end > start + 0.25, (start, end)
    assert {
        "reward/mean",
        "reward/std",
        "loss/policy",
        "grad/norm",
        "entropy",
        "completion/length",
        "reward/baseline",
    } <= set(history[-1])


def test_a_few_reinforce_steps_on_arith_change_parameters_and_write_the_record(tmp_path):
    """Two steps with β > 0 and the running-mean baseline: the adapter moves, kl/ref is logged, the record is
    complete."""
    from lab.records import load_run
    from lab.reinforce import train
    from lab.runner import load_for
    from lab.tasks import get_task

    cfg = ReinforceConfig(
        task="arith",
        steps=2,
        batch_size=8,
        beta=0.1,
        baseline="ema",
        eval_every=2,
        eval_size=8,
        out=str(tmp_path),
        run_id="r",
        lr=1e-2,
    )
    policy = load_for(cfg, get_task("arith"))
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    history = list(train(cfg, policy=policy))
    assert any(not torch.equal(before[n], p) for n, p in policy.model.named_parameters() if p.requires_grad)
    last = history[-1]
    for key in (
        "reward/mean",
        "reward/std",
        "loss/policy",
        "grad/norm",
        "kl/ref",
        "entropy",
        "completion/length",
        "eval/accuracy",
    ):
        assert key in last, key
    run = load_run(Path(tmp_path) / "r")
    assert run.status["status"] == "completed"
    assert [m["step"] for m in run.metrics] == [1, 2]
    assert json.dumps(run.samples)  # samples are plain JSON
    assert "eval/accuracy" in run.status["summary"]["after"]


def test_reinforce_at_beta_0_logs_kl_ref_every_step_by_default(tmp_path):
    """β = 0 with the default kl_every = 1: every step logs kl/ref, the k1 token mean of log π_θ − log π_ref over
    the step's samples (what β > 0 logs), taken before the step's update: 0 at step 1 with a fresh LoRA adapter
    (B = 0), positive once it has moved. Two microbatches: their token-weighted shares add up to the batch mean."""
    from lab.reinforce import train
    from lab.runner import load_for
    from lab.tasks import get_task

    cfg = ReinforceConfig(
        task="arith",
        steps=3,
        batch_size=8,
        microbatch_size=4,
        eval_every=0,
        eval_size=4,
        sample_every=0,
        out=str(tmp_path),
        run_id="k",
        lr=3e-2,
    )
    assert cfg.beta == 0 and cfg.kl_every == 1
    history = list(train(cfg, policy=load_for(cfg, get_task("arith"))))
    assert all("kl/ref" in m for m in history)
    assert history[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["kl/ref"] != pytest.approx(0.0, abs=1e-6)


def test_reinforce_with_kl_every_0_never_touches_the_reference(tmp_path):
    """β = 0 and kl_every = 0: no π_ref pass at all, and no kl/ref."""
    from lab.reinforce import train
    from lab.runner import load_for
    from lab.tasks import get_task

    cfg = ReinforceConfig(
        task="arith",
        steps=2,
        batch_size=4,
        eval_every=0,
        eval_size=4,
        sample_every=0,
        kl_every=0,
        out=str(tmp_path),
        run_id="n",
    )
    policy = load_for(cfg, get_task("arith"))

    def no_reference():
        raise AssertionError("β = 0 and kl_every = 0 must not compute the reference")

    policy.reference = no_reference
    history = list(train(cfg, policy=policy))
    assert not any("kl/ref" in m for m in history)
