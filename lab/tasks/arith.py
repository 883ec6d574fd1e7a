"""arith: two-digit addition with a verifiable reward.

    prompt      "47+38="      (both operands in 10..99; 8,100 problems)
    completion  "85"          (decimal sum, then eos)
    gold        r(x, y) = 1 if y is the exact sum else 0

The built-in policy (lab/models/arith, character-level) was pretrained on data that makes a
"common mistake": on problems whose ones digits carry (7+8 = 15), the carry into the tens digit
is dropped on CARRY_DROP_RATE = 60% of the examples (47+38= "75" instead of "85"). A model that
fits that data answers greedily wrong on carry problems (0.6 > 0.4) and right otherwise, while
sampling the correct answer about 40% of the time on carry problems: exactly the situation where
RL on a verifiable reward (GRPO) can push greedy accuracy towards 100%.

Measured on the 200 held-out problems with the shipped model (`python -m lab pretrain arith`, seed 0;
44% of them carry):
    greedy accuracy                      0.58   (no-carry problems 1.00)
    sampling accuracy (temperature 1)    0.73
    on carry problems, sampled answers   37% correct, 62% dropped carry, 1% other
The 1,500-step model slightly under-fits the carry (37% rather than 40% correct). At a 70% drop
rate the same recipe gives greedy 0.56 but only 24% correct samples on carry problems.

Splits (seeded, disjoint): 200 held-out problems never seen in pretraining; the other 7,900 are the
training prompts and the pretraining set. max_new_tokens = 4 (up to three digits and eos).
"""

from __future__ import annotations

import random

from .base import Task, normalize_split

CARRY_DROP_RATE = 0.6  # fraction of carry problems whose pretraining answer drops the carry
HELDOUT_SIZE = 200  # held-out problems, never seen in pretraining
SPLIT_SEED = 1234  # fixes which problems are held out
SFT_SEED = 4321  # fixes which sft_rows carry the mistake
CHARS = list("0123456789+=")  # the whole character vocabulary


def make_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    """ "47+38=" -> (47, 38)."""
    left, right = prompt.rstrip().rstrip("=").split("+")
    return int(left), int(right)


def has_carry(a: int, b: int) -> bool:
    """Do the ones digits carry into the tens digit?"""
    return a % 10 + b % 10 >= 10


def dropped_carry_answer(a: int, b: int) -> int:
    """The common mistake: add digit by digit but forget the carry. 47+38 -> 75 (correct: 85)."""
    ones = (a % 10 + b % 10) % 10
    tens = a // 10 + b // 10
    return 10 * tens + ones


def _splits() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, eval) operand pairs: one seeded shuffle of all 8,100 problems, cut once."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(SPLIT_SEED).shuffle(pairs)
    return pairs[HELDOUT_SIZE:], pairs[:HELDOUT_SIZE]


class ArithTask(Task):
    name = "arith"
    kind = "verifiable"
    model = "arith"
    max_new_tokens = 4
    tokenizer_level = "char"
    description = "two-digit addition '47+38=' -> '85'; reward 1 for the exact sum"

    def __init__(self):
        self._train_pairs, self._eval_pairs = _splits()

    def _pairs(self, split: str) -> list[tuple[int, int]]:
        return self._train_pairs if normalize_split(split) == "train" else self._eval_pairs

    def train_prompts(self) -> list[str]:
        return [make_prompt(a, b) for a, b in self._train_pairs]

    def eval_prompts(self) -> list[str]:
        return [make_prompt(a, b) for a, b in self._eval_pairs]

    def gold_reward(self, prompt: str, completion: str, truncated: bool = False) -> float:
        # Exact match on the digits; surrounding whitespace is forgiven so other tokenizers
        # (which may emit " 85") are scored on the answer, not on spacing.
        a, b = parse_prompt(prompt)
        return 1.0 if completion.strip() == str(a + b) else 0.0

    def _pretrain_answer(self, a: int, b: int, rng: random.Random) -> int:
        if has_carry(a, b) and rng.random() < CARRY_DROP_RATE:
            return dropped_carry_answer(a, b)
        return a + b

    def sample_pretrain_rows(self, n: int, rng: random.Random) -> list[dict]:
        # Only training problems: the held-out ones must stay unseen.
        rows = []
        for _ in range(n):
            a, b = rng.choice(self._train_pairs)
            rows.append({"prompt": make_prompt(a, b), "completion": str(self._pretrain_answer(a, b, rng))})
        return rows

    def sft_rows(self, split: str = "train") -> list[dict]:
        """One row per prompt of the split, with the pretraining mistake rate (a fixed seeded draw)."""
        rng = random.Random(f"{SFT_SEED}-{normalize_split(split)}")
        return [
            {"prompt": make_prompt(a, b), "completion": str(self._pretrain_answer(a, b, rng))}
            for a, b in self._pairs(split)
        ]

    def vocabulary(self) -> list[str]:
        return list(CHARS)
