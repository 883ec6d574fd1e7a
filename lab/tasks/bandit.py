"""bandit: one-token answers, a known reward for every token, and the exact KL-regularized optimum.

    prompt      "pick a colour :"        (6 prompts, PROMPTS below)
    completion  "green"                  (exactly one token; max_new_tokens = 1, then the episode ends)
    gold        r(x, y) = REWARDS[x][y] for the prompt's answer words, NON_ANSWER_REWARD = -1 for any
                other token of the vocabulary (special tokens included)

Because the response space is the vocabulary, everything is computable exactly. The KL-regularized
objective

    max_π  E_{y~π(·|x)}[ r(x, y) ] − β · KL( π(·|x) ‖ π_ref(·|x) )

has the closed-form maximizer (Ziebart 2010; Rafailov et al. 2023, eq. 4)

    π*(y|x) = π_ref(y|x) · exp(r(x, y) / β) / Z(x),    Z(x) = Σ_y π_ref(y|x) · exp(r(x, y) / β)

so a method (PPO, DPO, GRPO ...) can be scored by KL(π* ‖ π_θ) instead of by samples.

    symbol            name here
    π_θ(y|x)          next_token_logprobs(model, tokenizer, prompts)   (B, V) log-probs
    π_ref(y|x)        ref_logprobs                                      (B, V)
    r(x, y)           reward_table(prompt, tokenizer) / reward_tables   (V,) / (B, V)
    β                 beta
    π*(y|x)           pi_star(ref_logprobs, rewards, beta)              (B, V) log-probs
    KL(p ‖ q)         kl(p_logprobs, q_logprobs)                        (B,)

The built-in policy (lab/models/bandit) was pretrained on answers drawn from REF_PROBS, which
deliberately puts little mass on the best answers, so π_ref spreads over the answers and disagrees
with the reward. Measured on the shipped model: its answer probabilities are within 0.023 of
REF_PROBS and it puts 0.1–0.2% mass on non-answer tokens. KL(π* ‖ π_ref) is 1.94 at β = 0.1,
0.28 at β = 0.5 and 0.067 at β = 1.

Splits: there is one set of prompts; train and eval prompts are the same 6, because the question
here is whether a method reaches π* on them, not generalization. `preference_rows("eval")` is an
independent draw of pairs. Legend: B = prompts, V = vocabulary.
"""

from __future__ import annotations

import functools
import math
import random

import torch

from .base import Task, load_builtin, normalize_split

NON_ANSWER_REWARD = -1.0  # r(x, y) for every token that is not one of x's answers

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


def _answers(prompt: str) -> dict[str, float]:
    if prompt not in REWARDS:
        raise ValueError(f"not a bandit prompt: {prompt!r}; the prompts are {PROMPTS}")
    return REWARDS[prompt]


# --- rewards over the vocabulary -----------------------------------------------------------------
def reward_table(prompt: str, tokenizer) -> torch.Tensor:
    """r(x, y) for every token y of the vocabulary: (V,) float32."""
    rewards = torch.full((len(tokenizer),), NON_ANSWER_REWARD)  # (V,)
    for answer, value in _answers(prompt).items():
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"bandit answer {answer!r} is not a single token of this tokenizer (got {ids})")
        rewards[ids[0]] = value
    return rewards


def reward_tables(prompts: list[str], tokenizer) -> torch.Tensor:
    """(B, V) stack of reward_table."""
    return torch.stack([reward_table(p, tokenizer) for p in prompts])


# --- the policy's exact distribution -------------------------------------------------------------
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """log π(y|x) over every single-token response y: (B, V) float32, from one forward pass.

    Naive equivalent: for each prompt alone, log_softmax(model(prompt_ids).logits[-1]). Here the
    prompts are left-padded together and positions count from each row's first real token, so
    every row computes what it would alone. Gradients flow; wrap in torch.no_grad() when scoring.
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    input_ids = enc["input_ids"].to(device)  # (B, P)
    attention_mask = enc["attention_mask"].to(device)  # (B, P)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.log_softmax(logits[:, -1, :].float(), dim=-1)  # (B, V)


# --- the closed-form optimum and KL ----------------------------------------------------------------
def pi_star(ref_logprobs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log π*(y|x) = log π_ref(y|x) + r(x, y)/β − log Z(x), with log Z by logsumexp.

    Shapes (V,) or (B, V); returns the same shape. β → ∞ gives π_ref, β → 0 gives the argmax of r
    (among tokens with π_ref > 0).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta}); beta → 0 is the argmax of the reward")
    scores = ref_logprobs.float() + rewards.float() / beta  # (B, V) unnormalized log π*
    return scores - torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, V)


def kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(p ‖ q) = Σ_y p(y) (log p(y) − log q(y)) over the last dim: (B, V) -> (B,).

    Terms with p(y) = 0 are 0 (the 0 · log 0 = 0 convention), even where q(y) = 0 too.
    """
    p = p_logprobs.exp()  # (B, V)
    terms = torch.where(p > 0, p * (p_logprobs - q_logprobs), torch.zeros_like(p))  # (B, V)
    return terms.sum(-1)  # (B,)


@torch.no_grad()
def kl_to_optimum(model, tokenizer, beta: float, ref_logprobs: torch.Tensor | None = None,
                  prompts: list[str] | None = None) -> float:
    """Mean over prompts of KL(π* ‖ π_θ), the distance of a policy from the optimum of its objective.

    π* is built from `ref_logprobs` (B, V), the reference policy's next_token_logprobs on the same
    prompts, or, when None, from the model itself at call time (then it measures how far the model
    is from the optimum of one more KL-regularized step starting from itself).
    """
    prompts = PROMPTS if prompts is None else prompts
    logprobs = next_token_logprobs(model, tokenizer, prompts)  # (B, V)
    ref_logprobs = logprobs if ref_logprobs is None else ref_logprobs.to(logprobs.device)
    rewards = reward_tables(prompts, tokenizer).to(logprobs.device)  # (B, V)
    star = pi_star(ref_logprobs, rewards, beta)  # (B, V)
    return kl(star, logprobs).mean().item()


def expected_reward(logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """E_{y~π}[r(x, y)] for (B, V) log-probs and rewards: (B,)."""
    return (logprobs.exp() * rewards).sum(-1)


# --- preference pairs -----------------------------------------------------------------------------
def make_preference_rows(n_pairs: int, seed: int, model=None, tokenizer=None,
                         prompts: list[str] | None = None) -> list[dict]:
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
        rows.append({"prompt": prompts[i], "chosen": tokenizer.convert_ids_to_tokens(y1),
                     "rejected": tokenizer.convert_ids_to_tokens(y2), "chosen_gold": r1, "rejected_gold": r2})
    return rows


@functools.lru_cache(maxsize=None)
def _builtin_preferences(split: str) -> tuple[dict, ...]:
    return tuple(make_preference_rows(PREF_SIZES[split], PREF_SEEDS[split]))


def gold_reward(prompt: str, completion: str) -> float:
    """r(x, y) for a completion given as text (one answer word)."""
    return _answers(prompt).get(completion.strip(), NON_ANSWER_REWARD)


# --- the task -----------------------------------------------------------------------------------
class BanditTask(Task):
    name = "bandit"
    kind = "bandit"
    model = "bandit"
    max_new_tokens = 1
    tokenizer_level = "word"
    description = "one-token answers 'pick a colour :' -> 'red'; known rewards, exact optimum π*"

    def train_prompts(self) -> list[str]:
        return list(PROMPTS)

    def eval_prompts(self) -> list[str]:
        return list(PROMPTS)  # same prompts by design, see the module docstring

    def gold_reward(self, prompt: str, completion: str, truncated: bool = False) -> float:
        # `truncated` is always True here (one token, no eos) and changes nothing.
        return gold_reward(prompt, completion)

    def sample_pretrain_rows(self, n: int, rng: random.Random) -> list[dict]:
        rows = []
        for _ in range(n):
            prompt = rng.choice(PROMPTS)
            answers = REF_PROBS[prompt]
            answer = rng.choices(list(answers), weights=list(answers.values()))[0]
            rows.append({"prompt": prompt, "completion": answer})
        return rows

    def sft_rows(self, split: str = "train") -> list[dict]:
        """50 answers per prompt drawn from REF_PROBS (fixed seeded draw)."""
        split = normalize_split(split)
        rng = random.Random(f"sft-{split}")
        rows = []
        for prompt in PROMPTS:
            answers = REF_PROBS[prompt]
            for answer in rng.choices(list(answers), weights=list(answers.values()), k=50):
                rows.append({"prompt": prompt, "completion": answer})
        return rows

    def preference_rows(self, split: str = "train") -> list[dict]:
        """Bradley–Terry pairs from the built-in π_ref: 2,000 (train) or 500 (eval), seeded."""
        return [dict(row) for row in _builtin_preferences(normalize_split(split))]

    def vocabulary(self) -> list[str]:
        words = [w for prompt in PROMPTS for w in prompt.split()]
        words += [a for answers in REWARDS.values() for a in answers]
        return list(dict.fromkeys(words))
