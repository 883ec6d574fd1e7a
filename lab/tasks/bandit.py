"""bandit: one-token answers, a known reward for every token, and the exact KL-regularized optimum.

    prompt      "pick a colour :"        (6 prompts, PROMPTS below)
    completion  "green"                  (exactly one token; max_new_tokens = 1, then the episode ends)
    gold        r(x, y) = REWARDS[x][y] for the prompt's answer words, NON_ANSWER_REWARD = -1 for any
                other token of the vocabulary (special tokens included)

The built-in instance of `lab.tasks.enumerable.EnumerableTask`: the math (π* = π_ref·exp(r/β)/Z, the exact KL,
the exact metrics) lives there and works on any task declared that way. This module keeps the built-in reward
table and the functions the notebooks and tests call by name (reward_table, kl_to_optimum, ... on the 6 prompts).

The built-in policy (lab/models/bandit) was pretrained on answers drawn from REF_PROBS, which
deliberately puts little mass on the best answers, so π_ref spreads over the answers and disagrees
with the reward. Measured on the shipped model: its answer probabilities are within 0.023 of
REF_PROBS and it puts 0.1–0.2% mass on non-answer tokens. KL(π* ‖ π_ref) is 1.94 at β = 0.1,
0.28 at β = 0.5 and 0.067 at β = 1.

Splits: there is one set of prompts; train and eval prompts are the same 6, because the question
here is whether a method reaches π* on them, not generalization. `preference_rows("eval")` is an
independent draw of pairs. Unlike a user's EnumerableTask, whose pairs come from `ref_probs`, the built-in
pairs are drawn from the shipped model itself (so now and then a pair holds a non-answer token).
Legend: B = prompts, V = vocabulary.
"""

from __future__ import annotations

import functools
import math
import random

import torch

from .base import load_builtin, normalize_split
from .enumerable import NON_ANSWER_REWARD, EnumerableTask, expected_reward, kl, next_token_logprobs, pi_star  # noqa: F401

# prompt -> {answer: reward}. Each answer word is one token of the built-in tokenizer.
REWARDS: dict[str, dict[str, float]] = {
    "pick a colour :": {"red": 1.0, "green": 0.5, "yellow": 0.25, "blue": 0.0},
    "pick a fruit :": {"apple": 0.2, "banana": 0.0, "cherry": 1.0, "grape": 0.6},
    "pick an animal :": {"cat": 0.0, "dog": 0.4, "horse": 0.8, "owl": 1.0},
    "pick a number :": {"one": 0.0, "two": 0.3, "three": 1.0, "four": 0.5, "five": 0.1},
    "pick a drink :": {"tea": 0.7, "coffee": 0.0, "water": 1.0},
    "pick a season :": {"spring": 0.5, "summer": 0.0, "autumn": 1.0, "winter": 0.2},
}
# prompt -> {answer: probability} of the pretraining data, i.e. roughly π_ref. The best answer is rare.
REF_PROBS: dict[str, dict[str, float]] = {
    "pick a colour :": {"red": 0.10, "green": 0.25, "yellow": 0.20, "blue": 0.45},
    "pick a fruit :": {"apple": 0.35, "banana": 0.30, "cherry": 0.10, "grape": 0.25},
    "pick an animal :": {"cat": 0.40, "dog": 0.30, "horse": 0.15, "owl": 0.15},
    "pick a number :": {"one": 0.30, "two": 0.25, "three": 0.10, "four": 0.15, "five": 0.20},
    "pick a drink :": {"tea": 0.30, "coffee": 0.55, "water": 0.15},
    "pick a season :": {"spring": 0.20, "summer": 0.45, "autumn": 0.10, "winter": 0.25},
}
PROMPTS = list(REWARDS)
PREF_SIZES = {"train": 2000, "eval": 500}  # pairs per split
PREF_SEEDS = {"train": 0, "eval": 1}


class BanditTask(EnumerableTask):
    """The built-in bandit: REWARDS and REF_PROBS, the shipped model, and pairs drawn from that model."""

    name = "bandit"
    model = "bandit"
    description = "one-token answers 'pick a colour :' -> 'red'; known rewards, exact optimum π*"

    def __init__(self) -> None:
        super().__init__(
            "bandit",
            REWARDS,
            ref_probs=REF_PROBS,
            non_answer_reward=NON_ANSWER_REWARD,
            model="bandit",
            description=self.description,
        )

    def preference_rows(self, split: str = "train") -> list[dict]:
        """Bradley–Terry pairs from the built-in π_ref: 2,000 (train) or 500 (eval), seeded."""
        return [dict(row) for row in _builtin_preferences(normalize_split(split))]


BUILTIN = BanditTask()


# --- the functions on the built-in table, by name ----------------------------------------------------
def reward_table(prompt: str, tokenizer) -> torch.Tensor:
    """r(x, y) for every token y of the vocabulary: (V,) float32."""
    return BUILTIN.reward_table(prompt, tokenizer)


def reward_tables(prompts: list[str], tokenizer) -> torch.Tensor:
    """(B, V) stack of reward_table."""
    return BUILTIN.reward_tables(prompts, tokenizer)


def gold_reward(prompt: str, completion: str) -> float:
    """r(x, y) for a completion given as text (one answer word)."""
    return BUILTIN.gold_reward(prompt, completion)


@torch.no_grad()
def kl_to_optimum(
    model, tokenizer, beta: float, ref_logprobs: torch.Tensor | None = None, prompts: list[str] | None = None
) -> float:
    """Mean over prompts of KL(π* ‖ π_θ), the distance of a policy from the optimum of its objective.

    π* is built from `ref_logprobs` (B, V), the reference policy's next_token_logprobs on the same
    prompts, or, when None, from the model itself at call time (then it measures how far the model
    is from the optimum of one more KL-regularized step starting from itself).
    """
    return BUILTIN.kl_to_optimum(model, tokenizer, beta, ref_logprobs, prompts)


# --- preference pairs -----------------------------------------------------------------------------
def make_preference_rows(
    n_pairs: int, seed: int, model=None, tokenizer=None, prompts: list[str] | None = None
) -> list[dict]:
    """Pairs (y1, y2) drawn from π_ref (the built-in policy by default), labelled Bradley–Terry.

    For each pair: x uniform over the prompts; y1 ≠ y2 drawn from π_ref(·|x) restricted to ordinary
    tokens (a special token such as eos cannot be written as completion text, and π_ref gives the
    special tokens almost no mass anyway); y1 is chosen with probability σ(r(x, y1) − r(x, y2)).
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_builtin("bandit")
    prompts = PROMPTS if prompts is None else prompts
    with torch.no_grad():
        ref_logprobs = next_token_logprobs(model, tokenizer, prompts).cpu()  # (B, V)
    ref_logprobs[:, tokenizer.all_special_ids] = -math.inf
    probs = ref_logprobs.exp()  # (B, V)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rows = []
    while len(rows) < n_pairs:
        i = rng.randrange(len(prompts))
        y1, y2 = torch.multinomial(probs[i], 2, replacement=True, generator=generator).tolist()
        if y1 == y2:  # a tie teaches nothing about preferences
            continue
        r1 = gold_reward(prompts[i], tokenizer.convert_ids_to_tokens(y1))
        r2 = gold_reward(prompts[i], tokenizer.convert_ids_to_tokens(y2))
        if rng.random() >= 1.0 / (1.0 + math.exp(-(r1 - r2))):  # y2 wins with prob σ(r2 − r1)
            y1, y2, r1, r2 = y2, y1, r2, r1
        rows.append(
            {
                "prompt": prompts[i],
                "chosen": tokenizer.convert_ids_to_tokens(y1),
                "rejected": tokenizer.convert_ids_to_tokens(y2),
                "chosen_gold": r1,
                "rejected_gold": r2,
            }
        )
    return rows


@functools.cache
def _builtin_preferences(split: str) -> tuple[dict, ...]:
    return tuple(make_preference_rows(PREF_SIZES[split], PREF_SEEDS[split]))
