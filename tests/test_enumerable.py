"""A task declared by the user (lab.tasks.EnumerableTask + register) gets π*, every exact metric and DPO's optimum."""

import math

import pytest
import torch

from lab.tasks import TASKS, EnumerableTask, get_task, register
from lab.tasks.base import load_builtin
from lab.tasks.enumerable import exact_metrics, kl, next_token_logprobs, pi_star, support_mask

# A new task on the built-in bandit policy's vocabulary, with rewards that reverse what π_ref prefers.
REWARDS = {
    "pick a colour :": {"blue": 1.0, "yellow": 0.6, "green": 0.2, "red": 0.0},
    "pick a drink :": {"coffee": 0.0, "tea": 1.0, "water": 0.5},
}


@pytest.fixture
def tastes():
    """The task, registered as 'tastes' for the test and removed afterwards (other tests list TASKS)."""
    task = register(EnumerableTask("tastes", REWARDS, model="bandit", pairs=2000))
    yield task
    TASKS.pop("tastes", None)


@pytest.fixture(scope="module")
def builtin():
    torch.set_num_threads(1)
    return load_builtin("bandit")


def test_exact_metrics_hand_computed():
    """V = 4, π_θ = (1/2, 1/4, 1/8, 1/8), π_ref uniform, r = (ln 2, 0, 0, 0), β = 1, support S = {0, 1}:
    π* ∝ (2, 1, 1, 1) = (0.4, 0.2, 0.2, 0.2);
    exact_reward = ½ ln 2 = 0.346574;  kl_ref = ½ ln 2 + ¼ ln ½ = ¼ ln 2 = 0.173287;
    kl_to_optimum = 0.4 ln 0.8 + 0.2 ln 0.8 + 0.4 ln 1.6 = 0.054115;
    on S both are (2/3, 1/3), so kl_to_optimum_support = 0, while mass_off_support = 1/8 + 1/8 = 0.25:
    the policy matches π* on the support and still puts the wrong mass off it.
    A second prompt with an empty support counts in the first three, not in the two support metrics."""
    logprobs = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log().repeat(2, 1)  # (2, 4)
    ref_logprobs = torch.full((2, 4), 0.25).log()  # (2, 4)
    rewards = torch.tensor([[math.log(2), 0.0, 0.0, 0.0]]).repeat(2, 1)  # (2, 4)
    support = torch.tensor([[True, True, False, False], [False] * 4])  # (2, 4)
    out = exact_metrics(logprobs, rewards, ref_logprobs, 1.0, support)
    assert out["exact_reward"] == pytest.approx(0.5 * math.log(2), abs=1e-6)
    assert out["kl_ref"] == pytest.approx(0.25 * math.log(2), abs=1e-6)
    assert out["kl_to_optimum"] == pytest.approx(0.6 * math.log(0.8) + 0.4 * math.log(1.6), abs=1e-6)
    assert out["kl_to_optimum_support"] == pytest.approx(0.0, abs=1e-6)
    assert out["mass_off_support"] == pytest.approx(0.25, abs=1e-6)
    assert "mass_off_support" not in exact_metrics(logprobs, rewards, ref_logprobs, 1.0, torch.zeros(2, 4).bool())


def test_a_declared_task_is_found_by_name_and_scores_by_its_table(tastes, builtin):
    _, tokenizer = builtin
    assert get_task("tastes") is tastes and tastes.kind == "bandit" and tastes.max_new_tokens == 1
    assert tastes.gold_reward("pick a colour :", "blue") == 1.0
    assert tastes.gold_reward("pick a colour :", "cherry") == -1.0  # not an answer of this prompt
    table = tastes.reward_table("pick a drink :", tokenizer)  # (V,)
    assert table[tokenizer.convert_tokens_to_ids("tea")] == 1.0 and (table == -1.0).sum() == len(tokenizer) - 3
    with pytest.raises(ValueError, match="not a tastes prompt"):
        tastes.reward_table("pick a car :", tokenizer)
    # a reward function instead of a table gives the same task
    same = EnumerableTask(
        "tastes2", answers={p: list(t) for p, t in REWARDS.items()}, reward_fn=lambda p, a: REWARDS[p][a]
    )
    assert same.rewards == tastes.rewards
    # Bradley–Terry pairs: the better answer wins more often than not, never a tie; eval is a separate draw
    rows = tastes.preference_rows("train")
    assert len(rows) == 2000 and len(tastes.preference_rows("eval")) == 500
    assert all(r["chosen"] != r["rejected"] and r["chosen"] in REWARDS[r["prompt"]] for r in rows)
    assert 0.55 < sum(r["chosen_gold"] > r["rejected_gold"] for r in rows) / len(rows) < 0.75
    with pytest.raises(ValueError, match="built-in"):
        register(EnumerableTask("bandit", REWARDS))
    with pytest.raises(ValueError, match="already registered"):
        register(EnumerableTask("tastes", REWARDS))


def test_pi_star_and_the_exact_kl_on_a_declared_task(tastes, builtin):
    """π*(a)/π*(b) = π_ref(a)/π_ref(b) · exp((r_a − r_b)/β) for any two tokens; KL(π*‖π_θ) is 0 at π_θ = π*, and the
    exact evaluator (lab.evaluate.bandit_exact, used by every trainer) gives the declared task's numbers."""
    from lab.evaluate import bandit_exact

    model, tokenizer = builtin
    beta, prompts = 0.5, tastes.eval_prompts()
    with torch.no_grad():
        ref_logprobs = next_token_logprobs(model, tokenizer, prompts)  # (2, V)
    rewards = tastes.reward_tables(prompts, tokenizer)  # (2, V)
    star = pi_star(ref_logprobs, rewards, beta)  # (2, V)
    blue, red = tokenizer.convert_tokens_to_ids("blue"), tokenizer.convert_tokens_to_ids("red")
    assert (star[0, blue] - star[0, red]).item() == pytest.approx(
        (ref_logprobs[0, blue] - ref_logprobs[0, red]).item() + (1.0 - 0.0) / beta, abs=1e-5
    )
    torch.testing.assert_close(star.exp().sum(-1), torch.ones(2))
    assert kl(star, star).abs().max().item() < 1e-6
    start = tastes.kl_to_optimum(model, tokenizer, beta, ref_logprobs)
    assert start == pytest.approx(kl(star, ref_logprobs).mean().item(), rel=1e-5) and start > 0.2
    support = {p: set(t) for p, t in REWARDS.items()}
    exact = bandit_exact(model, tokenizer, tastes, beta=beta, ref_logprobs=ref_logprobs, support=support)
    assert exact["kl_to_optimum"] == pytest.approx(start, rel=1e-5)
    assert exact["exact_reward"] == pytest.approx((ref_logprobs.exp() * rewards).sum(-1).mean().item(), rel=1e-5)
    answers = support_mask(prompts, support, tokenizer)  # (2, V)
    assert answers.sum().item() == 7
    assert exact["mass_off_support"] == pytest.approx(
        1 - (ref_logprobs.exp() * answers).sum(-1).mean().item(), abs=1e-6
    )


def test_dpo_reaches_pi_star_on_a_declared_task(tastes, tmp_path):
    """The DPO trainer, given only the task's name, logs the exact metrics and moves π_θ to π*: KL(π*‖π_θ) ends
    ≤ 10% of its start over the whole vocabulary and over the support. Measured (60 steps): 0.288 → 0.006 whole,
    0.005 on the support, off-support mass 0.001 (π_ref already puts almost nothing off the answers)."""
    from lab.dpo import DPOConfig, train
    from lab.modeling import load_policy

    policy = load_policy(task="tastes", mode="full")
    beta = 0.5
    with torch.no_grad(), policy.reference() as ref:
        ref_logprobs = next_token_logprobs(ref, policy.tokenizer, tastes.eval_prompts())  # (2, V)
    start = tastes.kl_to_optimum(policy.model, policy.tokenizer, beta, ref_logprobs)
    cfg = DPOConfig(
        task="tastes",
        mode="full",
        beta=beta,
        steps=60,
        batch_size=64,
        lr=3e-4,
        sample_every=0,
        out=str(tmp_path),
        run_id="d",
    )
    last = list(train(cfg, policy=policy))[-1]
    end = tastes.kl_to_optimum(policy.model, policy.tokenizer, beta, ref_logprobs)
    assert last["eval/kl_to_optimum"] == pytest.approx(end, rel=1e-4)  # the logged metric is the exact KL
    assert end <= 0.1 * start, (start, end)
    assert last["eval/kl_to_optimum_support"] <= 0.1 * start
    assert 0.0 <= last["eval/mass_off_support"] < 0.01
