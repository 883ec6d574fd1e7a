"""The bandit task's exact math: π*, KL, and the policy's next-token distribution."""

import math
from types import SimpleNamespace

import pytest
import torch

from lab.tasks import get_task
from lab.tasks.bandit import (
    NON_ANSWER_REWARD,
    PROMPTS,
    REF_PROBS,
    REWARDS,
    expected_reward,
    kl,
    kl_to_optimum,
    next_token_logprobs,
    pi_star,
    reward_table,
    reward_tables,
)
from lab.tasks.base import load_builtin


@pytest.fixture(scope="module")
def builtin():
    return load_builtin("bandit")


def objective(logprobs, ref_logprobs, rewards, beta):
    """J(π) = E_π[r] − β · KL(π ‖ π_ref), (B, V) -> (B,)."""
    return expected_reward(logprobs, rewards) - beta * kl(logprobs, ref_logprobs)


def test_pi_star_hand_computed_three_actions():
    """π_ref = (1/2, 1/4, 1/4), r = (0, 1, 2), β = 1/ln 2, so exp(r/β) = 2^r = (1, 2, 4).

    π_ref · exp(r/β) = (1/2, 1/2, 1), Z = 2, π* = (1/4, 1/4, 1/2).
    """
    ref_logprobs = torch.tensor([0.5, 0.25, 0.25]).log()
    rewards = torch.tensor([0.0, 1.0, 2.0])
    star = pi_star(ref_logprobs, rewards, beta=1 / math.log(2))
    torch.testing.assert_close(star.exp(), torch.tensor([0.25, 0.25, 0.5]))


def test_kl_hand_computed():
    """KL((1/2, 1/2) ‖ (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 0.5 · (0.693147 − 0.405465) = 0.143841."""
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    assert kl(p, q).item() == pytest.approx(0.143841, abs=1e-5)


def test_kl_zero_at_self_and_nonnegative():
    torch.manual_seed(0)
    p = torch.randn(16, 10).log_softmax(-1)
    q = torch.randn(16, 10).log_softmax(-1)
    assert torch.allclose(kl(p, p), torch.zeros(16), atol=1e-6)
    assert (kl(p, q) >= 0).all()
    star = pi_star(q, torch.randn(16, 10), beta=0.3)
    assert torch.allclose(kl(star, star), torch.zeros(16), atol=1e-6)


def test_kl_ignores_zero_probability_terms():
    """0 · log(0/q) = 0, also where q = 0; and p > 0 where q = 0 gives +∞."""
    p = torch.tensor([[0.5, 0.5, 0.0]]).log()
    q = torch.tensor([[0.5, 0.5, 0.0]]).log()
    assert kl(p, q).item() == 0.0
    assert kl(q, torch.tensor([[1.0, 0.0, 0.0]]).log()).item() == math.inf


def test_pi_star_maximizes_regularized_objective():
    """J(π*) ≥ J(π) for Dirichlet samples and perturbations of π*; and J(π*) = β log Z."""
    torch.manual_seed(0)
    B, V, beta = 8, 6, 0.5
    ref_logprobs = torch.distributions.Dirichlet(torch.ones(V)).sample((B,)).log()  # (B, V)
    rewards = torch.randn(B, V)  # (B, V)
    star = pi_star(ref_logprobs, rewards, beta)
    best = objective(star, ref_logprobs, rewards, beta)  # (B,)

    log_z = torch.logsumexp(ref_logprobs + rewards / beta, dim=-1)  # (B,)
    torch.testing.assert_close(best, beta * log_z)

    others = torch.distributions.Dirichlet(torch.ones(V)).sample((500, B)).log()  # (500, B, V)
    assert (objective(others, ref_logprobs, rewards, beta) <= best + 1e-6).all()
    for scale in (1e-2, 1e-1, 1.0):
        nearby = (star + scale * torch.randn(500, B, V)).log_softmax(-1)
        assert (objective(nearby, ref_logprobs, rewards, beta) <= best + 1e-6).all()


def test_pi_star_beta_limits():
    """β → ∞: π* → π_ref. β → 0: π* → one-hot on the argmax of r."""
    torch.manual_seed(0)
    ref_logprobs = torch.randn(4, 7).log_softmax(-1)
    rewards = torch.randn(4, 7)
    torch.testing.assert_close(pi_star(ref_logprobs, rewards, 1e7).exp(), ref_logprobs.exp(), atol=1e-5, rtol=0)
    one_hot = torch.nn.functional.one_hot(rewards.argmax(-1), 7).float()
    torch.testing.assert_close(pi_star(ref_logprobs, rewards, 1e-3).exp(), one_hot, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="beta"):
        pi_star(ref_logprobs, rewards, 0.0)


def test_reward_table_covers_the_vocabulary(builtin):
    _, tokenizer = builtin
    table = reward_table("pick a colour :", tokenizer)
    assert table.shape == (len(tokenizer),)
    assert table[tokenizer.convert_tokens_to_ids("red")] == REWARDS["pick a colour :"]["red"]
    assert table[tokenizer.convert_tokens_to_ids("cherry")] == NON_ANSWER_REWARD  # another prompt's answer
    assert table[tokenizer.eos_token_id] == NON_ANSWER_REWARD
    assert (table == NON_ANSWER_REWARD).sum() == len(tokenizer) - len(REWARDS["pick a colour :"])
    assert reward_tables(PROMPTS, tokenizer).shape == (len(PROMPTS), len(tokenizer))
    with pytest.raises(ValueError, match="not a bandit prompt"):
        reward_table("pick a car :", tokenizer)


def test_next_token_logprobs_matches_naive_forward(builtin):
    """Batched, left-padded log-probs = softmax of each prompt's own unpadded forward pass."""
    model, tokenizer = builtin
    prompts = PROMPTS + ["pick a colour : pick a drink :"]  # a longer prompt forces left padding
    with torch.no_grad():
        batched = next_token_logprobs(model, tokenizer, prompts)  # (B, V)
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, P)
            probs = torch.softmax(model(input_ids=ids).logits[0, -1], dim=-1)  # (V,)
            torch.testing.assert_close(batched[i].exp(), probs, atol=1e-5, rtol=1e-4)


def test_builtin_reference_spreads_over_answers(builtin):
    """π_ref ≈ REF_PROBS on the answers, ~no mass elsewhere, and its favourite is never the best answer."""
    model, tokenizer = builtin
    with torch.no_grad():
        probs = next_token_logprobs(model, tokenizer, PROMPTS).exp()  # (B, V)
    for i, prompt in enumerate(PROMPTS):
        answer_ids = [tokenizer.convert_tokens_to_ids(a) for a in REF_PROBS[prompt]]
        for answer, token in zip(REF_PROBS[prompt], answer_ids):
            assert probs[i, token].item() == pytest.approx(REF_PROBS[prompt][answer], abs=0.05)
        assert probs[i, answer_ids].sum() > 0.99
        best = max(REWARDS[prompt], key=REWARDS[prompt].get)
        assert probs[i, tokenizer.convert_tokens_to_ids(best)] < 0.2


class FixedPolicy(torch.nn.Module):
    """A stand-in 'model' whose next-token log-probs after each prompt are given, to test kl_to_optimum."""

    def __init__(self, tokenizer, prompts, logprobs):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.table = {tuple(tokenizer(p)["input_ids"]): row for p, row in zip(prompts, logprobs)}
        self.pad_id = tokenizer.pad_token_id

    def forward(self, input_ids, attention_mask, position_ids=None):
        rows = [self.table[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(input_ids, attention_mask)]
        logits = torch.stack(rows)[:, None, :].expand(-1, input_ids.shape[1], -1)  # (B, P, V)
        return SimpleNamespace(logits=logits)


def test_kl_to_optimum_is_zero_exactly_at_pi_star(builtin):
    model, tokenizer = builtin
    beta = 0.2
    with torch.no_grad():
        ref_logprobs = next_token_logprobs(model, tokenizer, PROMPTS)  # (B, V)
    star = pi_star(ref_logprobs, reward_tables(PROMPTS, tokenizer), beta)
    at_optimum = FixedPolicy(tokenizer, PROMPTS, star)
    assert kl_to_optimum(at_optimum, tokenizer, beta, ref_logprobs=ref_logprobs) == pytest.approx(0.0, abs=1e-6)
    # the reference itself is far from π* at small β, and the default π_ref is the model itself
    far = kl_to_optimum(model, tokenizer, beta, ref_logprobs=ref_logprobs)
    assert far > 0.5
    assert kl_to_optimum(model, tokenizer, beta) == pytest.approx(far, rel=1e-5)


def test_bandit_preference_rows_follow_bradley_terry():
    """Labels agree with the reward as often as Bradley–Terry predicts: mean σ(|r1 − r2|) ± 3 std."""
    task = get_task("bandit")
    rows = task.preference_rows("train")
    assert len(rows) == 2000 and len(task.preference_rows("eval")) == 500
    assert rows == task.preference_rows("train")  # seeded
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert row["chosen_gold"] == task.gold_reward(row["prompt"], row["chosen"])
        assert row["rejected_gold"] == task.gold_reward(row["prompt"], row["rejected"])
    p_agree = [1 / (1 + math.exp(-abs(r["chosen_gold"] - r["rejected_gold"]))) for r in rows]
    agree = sum(
        1.0 if r["chosen_gold"] > r["rejected_gold"] else 0.5 if r["chosen_gold"] == r["rejected_gold"] else 0.0
        for r in rows
    )
    expected = sum(p_agree)
    std = math.sqrt(sum(p * (1 - p) for p in p_agree))
    assert abs(agree - expected) < 3 * std
    # every prompt's best answer shows up in the data, so DPO can find it
    for prompt in PROMPTS:
        best = max(REWARDS[prompt], key=REWARDS[prompt].get)
        assert sum(r["prompt"] == prompt and best in (r["chosen"], r["rejected"]) for r in rows) >= 30


def test_the_builtin_bandit_is_an_enumerable_task():
    """The built-in task is an instance of the general mechanism: same table, same non-answer reward, and the
    module-level functions give what its methods give."""
    from lab.tasks import EnumerableTask

    task = get_task("bandit")
    assert isinstance(task, EnumerableTask) and task.kind == "bandit"
    assert task.rewards == REWARDS and task.non_answer_reward == NON_ANSWER_REWARD
    assert task.gold_reward("pick a drink :", " water ") == 1.0 and task.gold_reward("pick a drink :", "red") == -1.0
    assert task.sft_rows()[:3] == task.sft_rows()[:3] and len(task.sft_rows()) == 50 * len(PROMPTS)


def test_grpo_logs_the_exact_kl_to_the_reference_at_beta_zero(tmp_path):
    """At β = 0 GRPO keeps no KL term, yet on bandit it logs ``eval/kl_ref``: the exact KL(π_θ‖π_ref) of the
    trained policy, equal to the sum over the vocabulary computed here from its next-token log-probs."""
    from lab.grpo import GRPOConfig, train
    from lab.rollout import bandit_reference
    from lab.runner import load_for

    cfg = GRPOConfig(
        task="bandit", steps=2, batch_size=2, group_size=4, lr=0.05, beta=0.0, eval_every=1, out=str(tmp_path)
    )
    policy = load_for(cfg, get_task("bandit"))
    task = get_task("bandit")
    metrics = list(train(cfg, policy=policy))
    logprobs = next_token_logprobs(policy.model, policy.tokenizer, task.eval_prompts())  # (B, V)
    expected = kl(logprobs, bandit_reference(policy, task)).mean().item()
    assert metrics[-1]["eval/kl_ref"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert expected > 1e-4  # lr 0.05 moved the policy, so the check is not 0 = 0
