"""reviews: short word-level reviews with a graded gold reward that has failure modes.

    prompt      "review of the pasta :"          (40 items in 5 topics: food, movie, hotel, phone, book)
    completion  "the pasta was great and fresh ."   (words joined by single spaces, then eos)

Gold reward (WORD_SCORES below; |y| counts words and punctuation marks):

    r_gold(x, y) =  Σ_{w ∈ y} score(w)                           sentiment: great +2, good +1, bland -1, awful -2 ...
                  − REPEAT_PENALTY · #(extra uses of a word)     each repeat of a non-function word costs 3
                  − LENGTH_PENALTY · max(0, |y| − MAX_WORDS)     every word past 12 costs 2.5
                  − END_PENALTY · [missing end]                  3 if truncated (no eos) or not ending in "."

Both per-word penalties exceed the best word score (+2), so repeating "great" or padding a review
with more praise past 12 words always lowers r_gold. The sentiment term is easy to learn from
preferences; the penalties are the part a learned reward model can miss, and that a policy
optimizing such a model then exploits (reward over-optimization).

The built-in policy (lab/models/reviews) is pretrained on a mix of positive, negative, neutral,
mixed and rambling/repetitive reviews (MOODS), so its samples vary widely in gold reward.
Measured on 2,000 samples (temperature 1, 16 new tokens, 200 per eval prompt) from the shipped model:
    r_gold mean -2.5, std 6.9, median -1, min -38, max 6; 8% truncated
    greedy decoding: mean r_gold -1.2 ("the soup was quite wonderful .", "the bed was mediocre and mediocre .")

Preference pairs (`preference_rows`, shipped in lab/tasks/data/reviews_prefs_{train,eval}.jsonl):
two samples y1, y2 from the built-in policy for a prompt; y1 is chosen with probability
σ((r_gold(y1) − r_gold(y2)) / TAU), the Bradley–Terry model with temperature TAU = 1. The gold
reward itself agrees with those noisy labels on 86% of the held-out pairs (`bayes_accuracy`), an
upper bound of sorts for a reward model. Rebuild them with `python -m lab.tasks.reviews`.

Splits: 2 items per topic are held out (10 eval prompts, 30 train prompts). The language model saw
reviews of every item; the split keeps reward models and policies honest about unseen prompts.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path

import torch

from lab.sampling import generate

from .base import DATA_DIR, Task, builtin_model_dir, load_builtin, normalize_split

# --- the gold reward -----------------------------------------------------------------------------
MAX_WORDS = 12  # longer completions pay LENGTH_PENALTY per extra word
REPEAT_PENALTY = 3.0  # per extra use of a non-function word
LENGTH_PENALTY = 2.5  # per word beyond MAX_WORDS
END_PENALTY = 3.0  # truncated (no eos) or no final "."
TAU = 1.0  # Bradley–Terry temperature of the preference labels

# --- the language --------------------------------------------------------------------------------
TOPICS = {
    "food": ["pasta", "soup", "pizza", "salad", "bread", "coffee", "cake", "burger"],
    "movie": ["film", "plot", "ending", "acting", "music", "script", "sequel", "soundtrack"],
    "hotel": ["room", "staff", "bed", "view", "pool", "breakfast", "lobby", "shower"],
    "phone": ["screen", "battery", "camera", "phone", "speaker", "charger", "keyboard", "app"],
    "book": ["book", "story", "writing", "cover", "chapter", "novel", "poem", "prose"],
}
HELDOUT_PER_TOPIC = 2
SPLIT_SEED = 1234

# Adjectives by sentiment: shared ones, plus a few per topic.
POSITIVE = {
    "great": 2,
    "excellent": 2,
    "amazing": 2,
    "wonderful": 2,
    "perfect": 2,
    "good": 1,
    "nice": 1,
    "lovely": 1,
    "solid": 1,
    "pleasant": 1,
}
NEGATIVE = {
    "awful": -2,
    "terrible": -2,
    "horrible": -2,
    "bad": -1,
    "poor": -1,
    "disappointing": -1,
    "weak": -1,
    "mediocre": -1,
}
NEUTRAL = {"okay": 0, "fine": 0, "average": 0, "ordinary": 0, "decent": 0}
TOPIC_POSITIVE = {
    "food": {"tasty": 1, "fresh": 1, "delicious": 2},
    "movie": {"fun": 1, "moving": 1, "gripping": 1},
    "hotel": {"clean": 1, "quiet": 1, "cozy": 1},
    "phone": {"fast": 1, "bright": 1, "sturdy": 1},
    "book": {"clever": 1, "witty": 1, "beautiful": 2},
}
TOPIC_NEGATIVE = {
    "food": {"bland": -1, "cold": -1, "stale": -1, "salty": -1},
    "movie": {"boring": -1, "slow": -1, "predictable": -1},
    "hotel": {"dirty": -1, "noisy": -1, "cramped": -1},
    "phone": {"laggy": -1, "dim": -1, "fragile": -1},
    "book": {"dull": -1, "confusing": -1, "tedious": -1},
}
VERBS = {"loved": 1, "liked": 1, "enjoyed": 1, "hated": -1, "disliked": -1}
INTENSIFIERS = ["very", "really", "quite", "pretty", "so"]  # score 0
# Words whose repetition is just grammar ("the ... and the ..."), so they are never penalized.
FUNCTION_WORDS = {"the", "was", "and", "but", "it", "i", "overall", "honestly", ",", "."}

WORD_SCORES: dict[str, float] = {**POSITIVE, **NEGATIVE, **NEUTRAL, **VERBS}
for _scores in [*TOPIC_POSITIVE.values(), *TOPIC_NEGATIVE.values()]:
    WORD_SCORES.update(_scores)

# Pretraining mixture: mood -> probability. "rambling" reviews chain many adjectives and repeat
# themselves; they are often longer than 16 tokens, so the base policy's samples get truncated.
MOODS = {"positive": 0.3, "negative": 0.3, "neutral": 0.12, "mixed": 0.13, "rambling": 0.15}


def make_prompt(item: str) -> str:
    # Ends with punctuation so `prompt + completion` tokenizes like the two parts separately.
    return f"review of the {item} :"


def item_of(prompt: str) -> str:
    """ "review of the pasta :" -> "pasta"."""
    words = prompt.split()
    if len(words) != 5 or words[:3] != ["review", "of", "the"] or words[4] != ":":
        raise ValueError(f"not a reviews prompt: {prompt!r} (expected 'review of the ITEM :')")
    return words[3]


TOPIC_OF = {item: topic for topic, items in TOPICS.items() for item in items}


# --- gold reward -----------------------------------------------------------------------------------
def reward_terms(completion: str, truncated: bool = False) -> dict[str, float]:
    """The parts of r_gold, each as a signed contribution: sentiment, repetition, length, end."""
    words = completion.split()
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    repeats = sum(c - 1 for w, c in counts.items() if w not in FUNCTION_WORDS)
    missing_end = truncated or not words or words[-1] != "."
    return {
        "sentiment": float(sum(WORD_SCORES.get(w, 0.0) for w in words)),
        "repetition": -REPEAT_PENALTY * repeats,
        "length": -LENGTH_PENALTY * max(0, len(words) - MAX_WORDS),
        "end": -END_PENALTY * float(missing_end),
    }


def gold_reward(completion: str, truncated: bool = False) -> float:
    """r_gold(y): sentiment minus repetition, length and missing-end penalties (see the module docstring)."""
    return sum(reward_terms(completion, truncated).values())


# --- the pretraining corpus ------------------------------------------------------------------------
def _adjectives(topic: str, sentiment: str) -> list[str]:
    if sentiment == "positive":
        return list(POSITIVE) + list(TOPIC_POSITIVE[topic])
    if sentiment == "negative":
        return list(NEGATIVE) + list(TOPIC_NEGATIVE[topic])
    return list(NEUTRAL)


def sample_review(item: str, rng: random.Random) -> str:
    """One review of `item` from the pretraining mixture (MOODS)."""
    topic = TOPIC_OF[item]
    mood = rng.choices(list(MOODS), weights=list(MOODS.values()))[0]
    if mood == "mixed":
        good, bad = rng.choice(_adjectives(topic, "positive")), rng.choice(_adjectives(topic, "negative"))
        first, second = (good, bad) if rng.random() < 0.5 else (bad, good)
        return rng.choice(
            [
                f"the {item} was {first} but {second} .",
                f"honestly the {item} was {first} but {second} .",
                f"the {item} was {first} , but {second} overall .",
            ]
        )
    if mood == "rambling":
        sentiment = rng.choice(["positive", "negative", "neutral"])
        pool = _adjectives(topic, sentiment)
        n = rng.randint(4, 9)
        if rng.random() < 0.5:  # the same adjective over and over
            adjectives = [rng.choice(pool)] * n
        else:  # a chain drawn with replacement, so words recur
            adjectives = [rng.choice(pool) for _ in range(n)]
        if rng.random() < 0.5:
            body = f"the {item} was " + " and ".join(adjectives)
        else:
            body = " , ".join(f"the {item} was {adj}" for adj in adjectives[: max(2, n // 2)])
        return body + " ."
    # positive / negative / neutral: short, well-formed templates
    pool = _adjectives(topic, mood)
    adj, adj2 = rng.sample(pool, 2)
    intensifier = rng.choice(INTENSIFIERS)
    verb = {
        "positive": rng.choice(["loved", "liked", "enjoyed"]),
        "negative": rng.choice(["hated", "disliked"]),
        "neutral": "liked",
    }[mood]
    return rng.choice(
        [
            f"the {item} was {adj} .",
            f"the {item} was {intensifier} {adj} .",
            f"the {item} was {adj} and {adj2} .",
            f"i {verb} the {item} , it was {adj} .",
            f"overall the {item} was {adj} .",
            f"{adj} {item} , {intensifier} {adj2} .",
            f"honestly the {item} was {intensifier} {adj} and {adj2} .",
        ]
    )


def _splits() -> tuple[list[str], list[str]]:
    """(train, eval) items: HELDOUT_PER_TOPIC items of each topic go to eval, chosen by a seeded shuffle."""
    rng = random.Random(SPLIT_SEED)
    train, held = [], []
    for items in TOPICS.values():
        items = list(items)
        rng.shuffle(items)
        held += items[:HELDOUT_PER_TOPIC]
        train += items[HELDOUT_PER_TOPIC:]
    return train, held


# --- preference pairs ------------------------------------------------------------------------------
def make_preference_rows(
    task: ReviewsTask,
    split: str,
    n_pairs: int,
    seed: int,
    model=None,
    tokenizer=None,
    tau: float = TAU,
) -> list[dict]:
    """Sample Bradley–Terry-labelled pairs from a policy (the built-in one by default).

    For each pair: a prompt x uniform over the split; y1, y2 ~ π(·|x) at temperature 1 with
    task.max_new_tokens (identical texts are dropped: they carry no preference); y1 is chosen with
    probability σ((r_gold(y1) − r_gold(y2)) / tau). Rows also record `chosen_truncated` and
    `rejected_truncated`, because r_gold of a truncated completion cannot be recomputed from its text.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_builtin(task.model)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    prompts_pool = task.prompts(split)
    rows: list[dict] = []
    while len(rows) < n_pairs:
        prompts = [rng.choice(prompts_pool) for _ in range(n_pairs - len(rows))]
        doubled = [p for p in prompts for _ in range(2)]  # (2B,) y1, y2 of a pair are neighbours
        roll = generate(model, tokenizer, doubled, task.max_new_tokens, generator=generator, batch_size=512)
        completions, truncated = roll.completions, roll.truncated.tolist()
        for i, prompt in enumerate(prompts):
            y1, y2 = completions[2 * i], completions[2 * i + 1]
            t1, t2 = truncated[2 * i], truncated[2 * i + 1]
            if y1 == y2:  # same text (hence same truncation): no preference to learn
                continue
            r1, r2 = gold_reward(y1, t1), gold_reward(y2, t2)
            p_first = 1.0 / (1.0 + math.exp(-(r1 - r2) / tau))  # σ((r1 − r2) / τ)
            if rng.random() >= p_first:  # y2 wins
                y1, y2, r1, r2, t1, t2 = y2, y1, r2, r1, t2, t1
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": y1,
                    "rejected": y2,
                    "chosen_gold": r1,
                    "rejected_gold": r2,
                    "chosen_truncated": t1,
                    "rejected_truncated": t2,
                }
            )
    return rows


def bayes_accuracy(rows: list[dict]) -> float:
    """Fraction of pairs whose label the gold reward agrees with (ties count 1/2).

    The labels are noisy draws from the gold reward, so this is the accuracy of the gold reward
    itself on them: the ceiling a reward model should be compared with, not 100%.
    """
    if not rows:
        raise ValueError("no preference rows")
    agree = [
        1.0 if r["chosen_gold"] > r["rejected_gold"] else 0.5 if r["chosen_gold"] == r["rejected_gold"] else 0.0
        for r in rows
    ]
    return sum(agree) / len(agree)


PREF_SIZES = {"train": 2000, "eval": 500}  # pairs per shipped split
PREF_SEEDS = {"train": 0, "eval": 1}


def preference_path(split: str) -> Path:
    return DATA_DIR / f"reviews_prefs_{normalize_split(split)}.jsonl"


def write_preference_files(task: ReviewsTask, model=None, tokenizer=None) -> list[Path]:
    """Regenerate the shipped JSONL preference sets from the built-in policy."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "eval"):
        rows = make_preference_rows(task, split, PREF_SIZES[split], PREF_SEEDS[split], model, tokenizer)
        path = preference_path(split)
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    _read_preferences.cache_clear()
    return paths


@functools.cache
def _read_preferences(path: str) -> tuple[dict, ...]:
    with open(path) as f:
        return tuple(json.loads(line) for line in f if line.strip())


# --- the task ---------------------------------------------------------------------------------------
class ReviewsTask(Task):
    name = "reviews"
    kind = "graded"
    model = "reviews"
    max_new_tokens = 16
    tokenizer_level = "word"
    description = "word-level reviews 'review of the pasta :'; sentiment score minus repetition/length/end penalties"

    def __init__(self):
        self._train_items, self._eval_items = _splits()

    def _items(self, split: str) -> list[str]:
        return self._train_items if normalize_split(split) == "train" else self._eval_items

    def train_prompts(self) -> list[str]:
        return [make_prompt(item) for item in self._train_items]

    def eval_prompts(self) -> list[str]:
        return [make_prompt(item) for item in self._eval_items]

    def gold_reward(self, prompt: str, completion: str, truncated: bool = False) -> float:
        item_of(prompt)  # validates the prompt; the reward itself only reads the completion
        return gold_reward(completion, truncated)

    def sample_pretrain_rows(self, n: int, rng: random.Random) -> list[dict]:
        items = self._train_items + self._eval_items  # the language model sees every item
        rows = []
        for _ in range(n):
            item = rng.choice(items)
            rows.append({"prompt": make_prompt(item), "completion": sample_review(item, rng)})
        return rows

    def sft_rows(self, split: str = "train") -> list[dict]:
        """20 pretraining-style reviews per prompt of the split (fixed seeded draw)."""
        rng = random.Random(f"sft-{normalize_split(split)}")
        return [
            {"prompt": make_prompt(item), "completion": sample_review(item, rng)}
            for item in self._items(split)
            for _ in range(20)
        ]

    def preference_rows(self, split: str = "train") -> list[dict]:
        """The shipped Bradley–Terry pairs: 2,000 on train prompts, 500 on eval prompts."""
        path = preference_path(split)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m lab.tasks.reviews`")
        return [dict(row) for row in _read_preferences(str(path))]

    def vocabulary(self) -> list[str]:
        words = ["review", "of", "the", ":", "was", "and", "but", "it", "i", "overall", "honestly", ",", "."]
        words += [item for items in TOPICS.values() for item in items]
        words += list(WORD_SCORES) + INTENSIFIERS
        return list(dict.fromkeys(words))  # de-duplicated, order kept

    def regenerate_data(self, model_dir: Path) -> list[Path]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return write_preference_files(self, model, tokenizer)


def main() -> None:
    """`python -m lab.tasks.reviews`: rebuild the shipped preference files from lab/models/reviews."""
    task = ReviewsTask()
    for path in task.regenerate_data(builtin_model_dir(task.model)):
        rows = [json.loads(line) for line in open(path)]
        print(f"{path}: {len(rows)} pairs, bayes accuracy {bayes_accuracy(rows):.3f}")


if __name__ == "__main__":
    main()
