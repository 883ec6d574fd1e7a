"""lab.baselines: SFT on the preferred answers, and best-of-N with a reward model."""

import json
import math

import pytest
import torch

from lab.baselines import BestOfNConfig, PreferredSFTConfig, best_of_n, kl_bound, train_preferred
from lab.config import ConfigError


def test_kl_bound_hand_computed():
    """log N − (N−1)/N: N=1 → 0; N=2 → 0.693147 − 0.5 = 0.193147; N=8 → 2.079442 − 0.875 = 1.204442."""
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(0.193147, abs=1e-6)
    assert kl_bound(8) == pytest.approx(1.204442, abs=1e-6)


def test_best_of_n_config_needs_a_reward_model():
    with pytest.raises(ConfigError, match="^reward_model:"):
        BestOfNConfig()
    with pytest.raises(ConfigError, match=r"^n: must be in \[1, 4096\], got 0"):
        BestOfNConfig(reward_model="x", n=0)


@pytest.fixture(scope="module")
def reviews_policy():
    from lab.baselines import _load_frozen_policy

    return _load_frozen_policy("reviews", "cpu")


def test_best_of_n_keeps_the_highest_scoring_sample(reviews_policy):
    """With the gold reward as the scorer, each pick's gold reward is the best of its N samples: ≥ their mean,
    and equal to the max over the same N samples drawn again with the same seed. With N = 1 the pick is the
    plain sample."""
    from lab.rewards import GoldReward
    from lab.sampling import generate
    from lab.tasks import get_task

    task = get_task("reviews")
    prompts = task.eval_prompts()[:4]
    rows = best_of_n(reviews_policy, GoldReward(task), prompts, 6, max_new_tokens=16, seed=3, task=task)
    assert [r["prompt"] for r in rows] == prompts
    gen = torch.Generator().manual_seed(3)
    roll = generate(
        reviews_policy.model, reviews_policy.tokenizer, [p for p in prompts for _ in range(6)], 16, generator=gen
    )
    gold = torch.tensor(task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())).view(4, 6)
    for i, row in enumerate(rows):
        assert row["gold_reward"] == pytest.approx(gold[i].max().item())
        assert row["score"] == pytest.approx(row["gold_reward"])
        assert row["mean_gold_reward"] == pytest.approx(gold[i].mean().item())
    assert sum(r["gold_reward"] for r in rows) > sum(r["mean_gold_reward"] for r in rows)
    single = best_of_n(reviews_policy, GoldReward(task), prompts, 1, max_new_tokens=16, seed=3, task=task)
    assert [r["gold_reward"] for r in single] == [r["mean_gold_reward"] for r in single]


def test_preferred_sft_ignores_the_rejected_answers():
    """The loss and its gradient are the same whatever the rejected answers say (only y_w is imitated)."""
    from lab.batching import encode_preference_batch, token_logprobs
    from lab.modeling import load_policy
    from lab.sft import sft_loss
    from lab.tasks import get_task

    policy = load_policy(task="reviews", mode="lora", lora_r=4, lora_alpha=8)
    # move off the zero-initialized adapter so every adapter weight gets a gradient
    for p in policy.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    rows = get_task("reviews").preference_rows("train")[:4]
    other = [{**r, "rejected": "the pasta was awful and awful ."} for r in rows]
    grads = []
    for data in (rows, other):
        batch = encode_preference_batch(policy.tokenizer, data, 256)
        logprobs, mask = token_logprobs(policy.model, batch)
        loss, _ = sft_loss(logprobs[:4], mask[:4])
        policy.model.zero_grad()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in policy.trainable_parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_preferred_sft_run_changes_the_adapter_and_reports_dpo_metrics(tmp_path):
    from lab.modeling import load_policy

    policy = load_policy(task="reviews", mode="lora", lora_r=4, lora_alpha=8)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    cfg = PreferredSFTConfig(steps=2, batch_size=4, eval_size=2, kl_samples=2, lr=1e-2, out=str(tmp_path), run_id="p")
    rows = list(train_preferred(cfg, policy=policy))
    assert [r["step"] for r in rows] == [1, 2]
    assert any(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters() if p.requires_grad)
    metrics = [json.loads(line) for line in open(tmp_path / "p" / "metrics.jsonl")]
    status = json.loads((tmp_path / "p" / "status.json").read_text())
    assert status["status"] == "completed"
    for key in (
        "loss/sft",
        "loss/dpo",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logprobs/chosen",
        "logprobs/rejected",
    ):
        assert key in metrics[0], key
    # implicit rewards come from each step's forward pass, before its update: 0 at step 1 (π_θ = π_ref), as in DPO
    assert metrics[0]["rewards/chosen"] == 0 and metrics[0]["loss/dpo"] == pytest.approx(math.log(2))
    assert metrics[1]["rewards/chosen"] != 0
    for key in ("kl/ref", "eval/gold_reward", "eval/sample_reward"):
        assert key in metrics[-1], key


def test_bon_command_prints_best_of_n_against_a_single_sample(tmp_path, capsys):
    """`python -m lab bon` end to end, with a reward model trained for two steps."""
    from lab.cli import main
    from lab.rm import RewardConfig, train

    list(
        train(
            RewardConfig(
                steps=2, batch_size=8, eval_pairs=8, mode="lora", lora_r=4, lora_alpha=8, out=str(tmp_path), run_id="rm"
            )
        )
    )
    code = main(
        ["bon", "--reward-model", str(tmp_path / "rm"), "--n", "4", "--rounds", "1", "--eval-size", "3", "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["picks"] == 3
    assert result["kl/ref"] == pytest.approx(math.log(4) - 3 / 4)
    assert result["rm/best"] >= result["rm/mean"]
    for key in ("eval/gold_reward", "eval/sample_reward"):
        assert isinstance(result[key], float)


def test_sft_on_preferred_logs_kl_ref_every_step(tmp_path):
    """Default kl_every = 1: kl/ref at every step, from fresh samples of π_θ before the step's update (the chosen
    answers are not π_θ's samples): 0 at step 1 with a fresh adapter (B = 0), nonzero once it has moved."""
    from lab.modeling import load_policy

    policy = load_policy(task="reviews", mode="lora", lora_r=4, lora_alpha=8)
    cfg = PreferredSFTConfig(
        steps=3,
        batch_size=4,
        eval_size=2,
        kl_samples=2,
        kl_prompts=4,
        lr=3e-2,
        sample_every=0,
        out=str(tmp_path),
        run_id="k",
    )
    assert cfg.kl_every == 1
    rows = list(train_preferred(cfg, policy=policy))
    assert all("kl/ref" in r for r in rows)
    assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl/ref"] != pytest.approx(0.0, abs=1e-6)
