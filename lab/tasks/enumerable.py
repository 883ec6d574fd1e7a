"""Enumerable tasks: a finite answer set per prompt, a known reward for every response, and the exact optimum π*.

Declare one and every exact metric works on it (``eval/exact_reward``, ``eval/kl_to_optimum``,
``eval/mass_off_support``, ``eval/kl_to_optimum_support``), in every trainer, the notebooks and the app::

    from lab.tasks import EnumerableTask, register

    task = register(EnumerableTask(
        "sizes",
        rewards={"pick a size :": {"small": 0.0, "medium": 0.5, "large": 1.0}},  # r(x, y) of each answer
        model="path/to/policy",  # answers must be single tokens of its tokenizer
        pairs=2000,  # optional: Bradley–Terry preference pairs for the reward model and DPO
    ))
    # then: DPOConfig(task="sizes", ...), get_task("sizes"), ...

A response is exactly one token (``max_new_tokens = 1``, no eos), so the response space is the vocabulary V:
the answers get their reward, every other token gets ``non_answer_reward``. Then everything is exact, with no
sampling. The KL-regularized objective

    max_π  E_{y~π(·|x)}[ r(x, y) ] − β · KL( π(·|x) ‖ π_ref(·|x) )

has the closed-form maximizer (Ziebart 2010; Rafailov et al. 2023, eq. 4)

    π*(y|x) = π_ref(y|x) · exp(r(x, y) / β) / Z(x),    Z(x) = Σ_y π_ref(y|x) · exp(r(x, y) / β)

    symbol            name here
    π_θ(y|x)          next_token_logprobs(model, tokenizer, prompts)   (B, V) log-probs
    π_ref(y|x)        ref_logprobs                                      (B, V)
    r(x, y)           task.reward_tables(prompts, tokenizer)            (B, V)
    β                 beta
    π*(y|x)           pi_star(ref_logprobs, rewards, beta)              (B, V) log-probs
    KL(p ‖ q)         kl(p_logprobs, q_logprobs)                        (B,)
    S(x)              support: the tokens seen as chosen or rejected for x in the training pairs   (B, V) bool

Preference pairs, when asked for (``pairs=N``), are drawn like the built-in bandit's: x uniform over the
prompts, y1 ≠ y2 from ``ref_probs`` over the answers (uniform when not given), y1 chosen with probability
σ(r(x, y1) − r(x, y2)). Legend: B = prompts, V = vocabulary.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from lab.ops import position_ids_from_mask

from .base import Task, normalize_split

NON_ANSWER_REWARD = -1.0  # default r(x, y) for every token that is not one of x's answers


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
    position_ids = position_ids_from_mask(attention_mask)  # (B, P)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.log_softmax(logits[:, -1, :].float(), dim=-1)  # (B, V)


# --- the closed-form optimum, KL and the metrics built on them --------------------------------------
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


def expected_reward(logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """E_{y~π}[r(x, y)] for (B, V) log-probs and rewards: (B,)."""
    return (logprobs.exp() * rewards).sum(-1)


def restrict(logprobs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """log π(y | x, y ∈ S(x)): the distribution renormalized over the support, −inf elsewhere. (B, V) -> (B, V).

    Naive equivalent: p = exp(logprobs) · support; log(p / p.sum(-1)).
    """
    masked = logprobs.float().masked_fill(~support, -math.inf)  # (B, V)
    return masked - torch.logsumexp(masked, dim=-1, keepdim=True)  # (B, V)


def mass_off_support(logprobs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """π(y ∉ S(x) | x) = 1 − Σ_{y ∈ S(x)} π(y|x): the probability of responses no training pair contains. (B,)"""
    return (1.0 - (logprobs.exp() * support).sum(-1)).clamp(min=0.0)  # (B,)


def support_mask(prompts: list[str], support: dict[str, set[str]], tokenizer) -> torch.Tensor:
    """(B, V) bool: token y of the vocabulary is in S(x), the set of chosen/rejected responses of prompt x in the
    training pairs (``support``, from ``pair_support``). A response that is not a single token cannot be a
    one-token response, so it is left out."""
    mask = torch.zeros(len(prompts), len(tokenizer), dtype=torch.bool)  # (B, V)
    for i, prompt in enumerate(prompts):
        for text in support.get(prompt, ()):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                mask[i, ids[0]] = True
    return mask


def pair_support(rows: list[dict]) -> dict[str, set[str]]:
    """prompt -> the set of responses that appear as chosen or rejected for it in preference ``rows``."""
    support: dict[str, set[str]] = {}
    for row in rows:
        support.setdefault(str(row["prompt"]), set()).update((row["chosen"], row["rejected"]))
    return support


@torch.no_grad()
def exact_metrics(
    logprobs: torch.Tensor,
    rewards: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float | None = None,
    support: torch.Tensor | None = None,
) -> dict:
    """Every exact metric of an enumerable task from (B, V) log-probs and rewards, averaged over the B prompts:

        exact_reward            E_{π_θ}[r]
        kl_ref                  KL(π_θ ‖ π_ref)                                   (given ref_logprobs)
        kl_to_optimum           KL(π* ‖ π_θ) over the whole vocabulary             (given ref_logprobs and β)
        mass_off_support        π_θ(y ∉ S(x))                                      (given support, (B, V) bool)
        kl_to_optimum_support   KL(π*|S ‖ π_θ|S), both renormalized over S(x)     (given all three)

    Prompts with an empty support are left out of the two support metrics (and they are absent when all are).
    """
    out = {"exact_reward": expected_reward(logprobs, rewards).mean().item()}
    star = None
    if ref_logprobs is not None:
        ref_logprobs = ref_logprobs.to(logprobs.device)
        out["kl_ref"] = kl(logprobs, ref_logprobs).mean().item()
        if beta:
            star = pi_star(ref_logprobs, rewards, beta)  # (B, V)
            out["kl_to_optimum"] = kl(star, logprobs).mean().item()
    if support is not None:
        support = support.to(logprobs.device)
        seen = support.any(-1)  # (B,) prompts with at least one response in the pairs
        if seen.any():
            out["mass_off_support"] = mass_off_support(logprobs[seen], support[seen]).mean().item()
            if star is not None:
                on = support[seen]
                out["kl_to_optimum_support"] = kl(restrict(star[seen], on), restrict(logprobs[seen], on)).mean().item()
    return out


# --- the task -----------------------------------------------------------------------------------
class EnumerableTask(Task):
    """A task whose responses are single tokens with a known reward each: the exact metrics and π* work on it.

    name               how trainers find it once registered (``lab.tasks.register``)
    rewards            {prompt: {answer: r}}: the reward table; or give ``answers`` and ``reward_fn``
    answers, reward_fn {prompt: [answer, ...]} and r = reward_fn(prompt, answer)
    non_answer_reward  r(x, y) of every other token of the vocabulary (special tokens included)
    ref_probs          {prompt: {answer: p}}: how pairs and SFT rows draw answers (default: uniform)
    model              the policy to train (built-in name, path or hub id); --model overrides it
    pairs              number of train preference pairs (eval: a quarter as many); 0: no preference data
    seed               seed of the pair draws (eval pairs use seed + 1)
    """

    kind = "bandit"
    max_new_tokens = 1
    tokenizer_level = "word"

    def __init__(
        self,
        name: str,
        rewards: dict[str, dict[str, float]] | None = None,
        *,
        answers: dict[str, list[str]] | None = None,
        reward_fn: Callable[[str, str], float] | None = None,
        non_answer_reward: float = NON_ANSWER_REWARD,
        ref_probs: dict[str, dict[str, float]] | None = None,
        model: str = "",
        pairs: int = 0,
        seed: int = 0,
        description: str = "",
    ) -> None:
        if (rewards is None) == (answers is None or reward_fn is None):
            raise ValueError(
                "give either rewards={prompt: {answer: r}} or both answers={prompt: [...]} and "
                "reward_fn(prompt, answer)"
            )
        if rewards is None:
            rewards = {p: {a: float(reward_fn(p, a)) for a in answer_list} for p, answer_list in answers.items()}
        if not rewards or any(not table for table in rewards.values()):
            raise ValueError("every prompt needs at least one answer")
        if ref_probs is not None and set(ref_probs) != set(rewards):
            raise ValueError("ref_probs must give a distribution for exactly the prompts of the reward table")
        self.name, self.model, self.pairs, self.seed = name, model, int(pairs), seed
        self.rewards = {p: {a: float(r) for a, r in table.items()} for p, table in rewards.items()}
        self.non_answer_reward = float(non_answer_reward)
        self.ref_probs = ref_probs
        self.description = description or f"enumerable task with {len(self.rewards)} prompts, one-token answers"

    # --- prompts and rewards --------------------------------------------------------------------
    def train_prompts(self) -> list[str]:
        return list(self.rewards)

    def eval_prompts(self) -> list[str]:
        return list(self.rewards)  # the question is whether a method reaches π* on them, not generalization

    def answers(self, prompt: str) -> dict[str, float]:
        """{answer: r(x, answer)} of one prompt."""
        if prompt not in self.rewards:
            raise ValueError(f"not a {self.name} prompt: {prompt!r}; the prompts are {list(self.rewards)}")
        return self.rewards[prompt]

    def gold_reward(self, prompt: str, completion: str, truncated: bool = False) -> float:
        # `truncated` is always True here (one token, no eos) and changes nothing.
        return self.answers(prompt).get(completion.strip(), self.non_answer_reward)

    def reward_table(self, prompt: str, tokenizer) -> torch.Tensor:
        """r(x, y) for every token y of the vocabulary: (V,) float32."""
        rewards = torch.full((len(tokenizer),), self.non_answer_reward)  # (V,)
        for answer, value in self.answers(prompt).items():
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                raise ValueError(
                    f"answer {answer!r} of task {self.name!r} is not a single token of this "
                    f"tokenizer (got {ids}); an enumerable task's responses are one token"
                )
            rewards[ids[0]] = value
        return rewards

    def reward_tables(self, prompts: list[str], tokenizer) -> torch.Tensor:
        """(B, V) stack of reward_table."""
        return torch.stack([self.reward_table(p, tokenizer) for p in prompts])

    @torch.no_grad()
    def kl_to_optimum(
        self, model, tokenizer, beta: float, ref_logprobs: torch.Tensor | None = None, prompts: list[str] | None = None
    ) -> float:
        """Mean over prompts of KL(π* ‖ π_θ), π* built from ``ref_logprobs`` (B, V) (None: the model itself)."""
        prompts = self.eval_prompts() if prompts is None else prompts
        logprobs = next_token_logprobs(model, tokenizer, prompts)  # (B, V)
        ref_logprobs = logprobs if ref_logprobs is None else ref_logprobs.to(logprobs.device)
        rewards = self.reward_tables(prompts, tokenizer).to(logprobs.device)  # (B, V)
        return kl(pi_star(ref_logprobs, rewards, beta), logprobs).mean().item()

    # --- data -----------------------------------------------------------------------------------
    def _draw(self, prompt: str, rng: random.Random, k: int = 1) -> list[str]:
        answers = list(self.answers(prompt))
        weights = [self.ref_probs[prompt].get(a, 0.0) for a in answers] if self.ref_probs else None
        return rng.choices(answers, weights=weights, k=k)

    def bradley_terry_rows(self, n_pairs: int, seed: int) -> list[dict]:
        """n pairs: x uniform, y1 ≠ y2 from ref_probs (uniform by default), y1 chosen with prob σ(r1 − r2)."""
        rng = random.Random(seed)
        prompts = [p for p in self.rewards if len(self.rewards[p]) > 1]  # one answer cannot make a pair
        if not prompts:
            raise ValueError(f"task {self.name!r}: no prompt has two answers, so there are no pairs to draw")
        rows = []
        while len(rows) < n_pairs:
            prompt = rng.choice(prompts)
            y1, y2 = self._draw(prompt, rng, k=2)
            if y1 == y2:  # a tie teaches nothing about preferences
                continue
            r1, r2 = self.rewards[prompt][y1], self.rewards[prompt][y2]
            if rng.random() >= 1.0 / (1.0 + math.exp(-(r1 - r2))):  # y2 wins with prob σ(r2 − r1)
                y1, y2, r1, r2 = y2, y1, r2, r1
            rows.append({"prompt": prompt, "chosen": y1, "rejected": y2, "chosen_gold": r1, "rejected_gold": r2})
        return rows

    def preference_rows(self, split: str = "train") -> list[dict]:
        if self.pairs <= 0:
            return super().preference_rows(split)  # says there is no preference data
        if normalize_split(split) == "train":
            return self.bradley_terry_rows(self.pairs, self.seed)
        return self.bradley_terry_rows(max(self.pairs // 4, 1), self.seed + 1)

    def sft_rows(self, split: str = "train") -> list[dict]:
        """50 answers per prompt drawn from ref_probs (uniform by default), a fixed seeded draw."""
        rng = random.Random(f"sft-{normalize_split(split)}")
        return [{"prompt": p, "completion": a} for p in self.rewards for a in self._draw(p, rng, k=50)]

    def sample_pretrain_rows(self, n: int, rng: random.Random) -> list[dict]:
        rows = []
        for _ in range(n):
            prompt = rng.choice(list(self.rewards))
            rows.append({"prompt": prompt, "completion": self._draw(prompt, rng)[0]})
        return rows

    def vocabulary(self) -> list[str]:
        words = [w for prompt in self.rewards for w in prompt.split()]
        words += [a for answers in self.rewards.values() for a in answers]
        return list(dict.fromkeys(words))
