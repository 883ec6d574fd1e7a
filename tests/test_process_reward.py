"""Process reward (DeepSeekMath §4.1.3): per-step rewards on arith, group-normalized, summed from each token on."""

import pytest
import torch

from lab.config import ConfigError
from lab.grpo import GRPOConfig, group_advantages
from lab.process_reward import arith_step_rewards, prefix_rewards, process_advantages
from lab.sampling import Rollout


def test_process_advantages_hand_computed():
    """G = 2, T = 3. Step rewards [1, 1, 1] and [1, 0, ·] (the second completion has two steps).
    R = {1, 1, 1, 1, 0}: mean 0.8, unbiased std sqrt((4·0.2² + 0.8²)/4) = sqrt(0.2) = 0.447214, so
    r̃ = 0.2/0.447214 = 0.447214 for a 1 and −0.8/0.447214 = −1.788854 for the 0 (ε = 0).
    Â_t = Σ of r̃ at or after t:  [1.341641, 0.894427, 0.447214]  and  [0.447214 − 1.788854, −1.788854, 0].
    """
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = process_advantages(rewards, mask, group_size=2, eps=0.0)
    expected = torch.tensor([[1.341641, 0.894427, 0.447214], [-1.341641, -1.788854, 0.0]])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


def test_one_step_at_the_end_is_outcome_supervision():
    """With a single step per completion, at its last token, every token's advantage is GRPO's group advantage."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 1, 4, 2, 4, 3])  # two groups of G = 3
    outcome = torch.randint(0, 2, (6,), generator=g).float()  # (B·G,)
    mask = (torch.arange(4)[None] < lengths[:, None]).long()  # (B·G, T)
    last = torch.nn.functional.one_hot(lengths - 1, 4)  # (B·G, T): the step ends at the last token
    advantages = process_advantages(last * outcome[:, None], last, group_size=3)
    expected = group_advantages(outcome, 3)[:, None] * mask  # (B·G, T)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


def test_prefix_rewards_on_arith_answers():
    """47+38 = 85: right digits earn 1 until the first wrong one; the end token earns 1 only for the whole sum."""
    assert prefix_rewards(["8", "5"], "85", ended=True) == [1, 1, 1]
    assert prefix_rewards(["7", "5"], "85", ended=True) == [0, 0, 0]  # the dropped carry: wrong from the start
    assert prefix_rewards(["8", "4"], "85", ended=True) == [1, 0, 0]
    assert prefix_rewards(["8"], "85", ended=True) == [1, 0]  # stopped early
    assert prefix_rewards(["8", "5", "3"], "85", ended=False) == [1, 1, 0]  # one digit too many, no end
    assert prefix_rewards([" 8", "5"], "85", ended=True) == [1, 1, 1]  # a leading space is forgiven


class _CharTokenizer:
    vocab = ["<pad>", "<eos>", *"0123456789+="]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_arith_step_rewards_from_a_rollout():
    """Completions "85<eos>" (right), "75<eos>" (dropped carry) and "853" (no end) for 47+38=: rewards per token."""
    tok = _CharTokenizer()
    ids = {c: i for i, c in enumerate(tok.vocab)}
    rows = [["8", "5", "<eos>"], ["7", "5", "<eos>"], ["8", "5", "3"]]
    completion_ids = torch.tensor([[ids[c] for c in row] + [0] for row in rows])  # (3, 4)
    roll = Rollout(
        prompts=["47+38="] * 3,
        completions=["85", "75", "853"],
        prompt_ids=torch.zeros(3, 1, dtype=torch.long),
        prompt_mask=torch.ones(3, 1, dtype=torch.long),
        completion_ids=completion_ids,
        completion_mask=torch.tensor([[1, 1, 1, 0]] * 3),
        truncated=torch.tensor([False, False, True]),
    )
    rewards, mask = arith_step_rewards(roll, tok)
    torch.testing.assert_close(rewards, torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]]))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1, 1, 0]] * 3))


@pytest.mark.parametrize(
    "changes,text",
    [
        ({"reward_mode": "steps"}, "must be one of outcome, process"),
        ({"reward_mode": "process", "task": "bandit"}, "needs task=arith and reward=gold"),
        ({"reward_mode": "process", "beta": 0.1}, "needs kl_mode k3 or k3_ratio"),
    ],
)
def test_reward_mode_is_validated(changes, text):
    with pytest.raises(ConfigError, match="^reward_mode: ") as err:
        GRPOConfig(**{"task": "arith", **changes})
    assert text in str(err.value)
    GRPOConfig(task="arith", reward_mode="process", beta=0.1, kl_mode="k3")  # the KL in the loss is fine
