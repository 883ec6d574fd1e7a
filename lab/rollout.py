"""What every on-policy method does before its loss: pick prompts, sample, score, and read log-probs back.

REINFORCE, GRPO and PPO all run the same first phases on each step::

    rows = next(batches)                                 # a batch of training rows: prompt + dataset columns
    roll = rollout(policy, [r["prompt"] for r in rows], cfg, generator)   # 1. sample completions (no grad)
    rewards = score(reward_fn, roll, prompt_columns(rows))   # 2. r(x, y) for each completion, (B,)
    logprobs = completion_logprobs(policy.model, roll)   # log π_θ(y_t | x, y_<t), (B, T), with grad
    ref_logprobs = reference_logprobs(policy, roll)      # log π_ref(y_t | x, y_<t), (B, T), no grad

and differ only in how rewards become advantages and how the loss uses them. This module holds those
shared phases and nothing method-specific. Shape legend: B batch, P prompt length, T completion length.
"""

from __future__ import annotations

import torch

from lab.ops import masked_mean, sequence_logprobs, sequence_logprobs_and_entropy
from lab.sampling import Rollout, format_prompt, generate

# ----------------------------------------------------------------------------------------------------------------------
# Prompts


def load_prompt_rows(cfg, task=None, split: str = "train") -> list[dict]:
    """Training rows ``{"prompt": ..., **columns}``: the prompt plus every other column of the data source (an
    ``answer`` for GSM8K), which reward functions receive as keyword lists, as in TRL. Built-in tasks have
    prompts only."""
    if task is not None:
        return [{"prompt": p} for p in (task.train_prompts() if split == "train" else task.eval_prompts())]
    from lab.data import load_rows

    rows = load_rows(cfg.task, format="prompt_only", split=split, skip_bad_rows=cfg.skip_bad_rows)
    return [dict(row) for row in rows]


# An instruct model's answer with its chat template's end token: TRL's default max_completion_length. 64 tokens
# truncated nearly every completion of a 0.5B instruct model on GSM8K-style prompts.
OWN_DATA_MAX_NEW_TOKENS = 256


def resolve_max_new_tokens(cfg, task=None) -> int:
    """``cfg.max_new_tokens``, else the task's own budget, else 256 tokens for data without a task."""
    return cfg.max_new_tokens or (task.max_new_tokens if task is not None else OWN_DATA_MAX_NEW_TOKENS)


def rollout_tokens(roll: Rollout) -> int:
    """Tokens a step processed for ``time/tokens_per_s``: the real prompt and completion tokens of the rollout."""
    return int(roll.prompt_mask.sum()) + int(roll.completion_mask.sum())


# ----------------------------------------------------------------------------------------------------------------------
# 1. rollout and 2. score


def rollout(
    policy, prompts: list, cfg, generator: torch.Generator | None = None, max_new_tokens: int | None = None
) -> Rollout:
    """Sample one completion per prompt from π_θ at ``cfg.temperature`` / ``cfg.top_p``. To sample G completions
    per prompt, repeat each prompt G times first (GRPO does)."""
    texts = [format_prompt(policy.tokenizer, p) for p in prompts]
    return generate(
        policy.model,
        policy.tokenizer,
        texts,
        max_new_tokens or cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        generator=generator,
    )


@torch.no_grad()
def score(reward_fn, roll: Rollout, columns: dict[str, list] | None = None) -> torch.Tensor:
    """r(x, y) for each completion of a rollout: (B,) float32 on the rollout's device. ``columns`` are the rows'
    extra dataset columns (lists of B values), passed to the reward function as keywords. A reward that is not one
    finite number per completion raises ``RewardValueError`` (a user error: the reward is the user's code)."""
    from lab.rewards import RewardValueError

    # TRL also hands reward functions the completion token ids (a length penalty needs them)
    completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(roll.completion_ids, roll.completion_mask)]
    rewards = reward_fn(
        roll.prompts, roll.completions, roll.truncated.tolist(), completion_ids=completion_ids, **(columns or {})
    )  # (B,)
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1).to(roll.completion_ids.device)
    name = getattr(reward_fn, "name", reward_fn)
    if rewards.numel() != len(roll):
        raise RewardValueError(f"reward {name!r} gave {rewards.numel()} values for {len(roll)} completions")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if len(bad):  # a NaN would turn the advantages, the loss and every weight into NaN at the next step
        i = int(bad[0])
        raise RewardValueError(
            f"reward {name!r} returned {rewards[i].item()} for completion {i} "
            f"({len(bad)} of {len(roll)} not finite); a reward must be a finite number"
        )
    return rewards


# ----------------------------------------------------------------------------------------------------------------------
# Log-probs of the sampled completions


def completion_logprobs(
    model, roll: Rollout, temperature: float = 1.0, with_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log π(y_t | x, y_<t) of a rollout's completion tokens under ``model``: (B, T) float32, gradients flow.

    Scored at the sampling temperature, so the ratio π_θ / π_old compares the distribution the tokens were drawn
    from. With ``with_entropy`` also returns the entropy of π at each completion position (B, T), from the same
    forward pass. Positions after EOS hold values too: mask them with ``roll.completion_mask``.
    """
    T = roll.completion_ids.shape[1]
    if with_entropy:
        return sequence_logprobs_and_entropy(model, roll.input_ids, roll.attention_mask, T, temperature)
    return sequence_logprobs(model, roll.input_ids, roll.attention_mask, T, temperature)  # (B, T)


@torch.no_grad()
def logprobs_in_chunks(model, roll: Rollout, temperature: float, rows: int) -> torch.Tensor:
    """log-probs of a whole rollout under a model that does not change meanwhile (π_old, π_ref), ``rows``
    completions per forward pass, so no pass holds more than ``rows`` × T × V logits: (B, T), no gradients.
    Naive equivalent: ``completion_logprobs(model, roll, temperature)`` in one pass."""
    return torch.cat(
        [completion_logprobs(model, roll.select(slice(i, i + rows)), temperature) for i in range(0, len(roll), rows)]
    )


def kl_due(step: int, every: int) -> bool:
    """Whether step ``step`` (1-based) logs the ``kl/ref`` diagnostic when it costs an extra π_ref pass: step 1 and
    every ``every`` steps after it; never when ``every`` is 0. Naive equivalent: ``step in range(1, steps + 1,
    every)``."""
    return every > 0 and (step - 1) % every == 0


@torch.no_grad()
def reference_logprobs(policy, roll: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log π_ref(y_t | x, y_<t): (B, T), no gradients (adapters switched off, or the frozen copy in full mode)."""
    with policy.reference() as ref:
        return completion_logprobs(ref, roll, temperature)  # (B, T)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and records shared by the on-policy methods


@torch.no_grad()
def rollout_metrics(roll: Rollout, rewards: torch.Tensor, correct: torch.Tensor | None = None) -> dict:
    """``reward/mean``, ``reward/std``, ``completion/length`` (tokens, EOS included) and, when ``correct`` (B,) bool is
    given (verifiable tasks), ``length/correct`` and ``length/incorrect`` (left out when that side is empty)."""
    lengths = roll.completion_mask.sum(-1).float()  # (B,)
    out = {
        "reward/mean": rewards.mean(),
        "reward/std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
        "completion/length": lengths.mean(),
        "completion/truncated_frac": roll.truncated.float().mean(),
    }
    if correct is not None:
        correct = correct.to(lengths.device)
        if correct.any():
            out["length/correct"] = masked_mean(lengths, correct)
        if (~correct).any():
            out["length/incorrect"] = masked_mean(lengths, ~correct)
    return out


def correct_mask(task, roll: Rollout) -> torch.Tensor | None:
    """(B,) bool: the completion earned the full gold reward, on verifiable tasks; None elsewhere."""
    if task is None or task.kind != "verifiable":
        return None
    gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
    return torch.tensor([g >= 1.0 for g in gold])


def eval_metrics(
    policy,
    task,
    n: int,
    beta: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    fixed_point: torch.Tensor | None = None,
) -> dict:
    """Greedy answers on ``n`` held-out prompts scored by the gold reward: ``eval/accuracy`` (verifiable tasks) or
    ``eval/gold_reward``; on ``bandit`` also the exact ``eval/exact_reward`` and, given β and π_ref's next-token
    log-probs, ``eval/kl_to_optimum`` = KL(π* ‖ π_θ); given the log-probs of the method's own fixed point (B, V),
    ``eval/kl_to_fixed_point`` = KL(π_fixed ‖ π_θ) (lab.fixed_points)."""
    from lab.evaluate import bandit_exact, evaluate

    if task is None:
        return {}
    with torch.no_grad():
        result = evaluate(policy, task, n=n)
    out = {"eval/accuracy": result["accuracy"]} if "accuracy" in result else {"eval/gold_reward": result["gold_reward"]}
    if task.kind == "bandit":
        with torch.no_grad():
            exact = bandit_exact(policy.model, policy.tokenizer, task, beta=beta, ref_logprobs=ref_logprobs)
        out["eval/exact_reward"] = exact["exact_reward"]
        if "kl_to_optimum" in exact:
            out["eval/kl_to_optimum"] = exact["kl_to_optimum"]
        if fixed_point is not None:
            from lab.fixed_points import kl_to_fixed_point

            out["eval/kl_to_fixed_point"] = kl_to_fixed_point(policy.model, policy.tokenizer, task, fixed_point)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# kl/ref of the methods that do not sample: fresh completions of π_θ (DPO, SFT on preferred, SFT)


@torch.no_grad()
def sample_heldout(policy, prompts: list[str], *, max_new_tokens: int, samples: int = 8, seed: int = 0):
    """``samples`` temperature-1 completions per held-out prompt from π_θ: a ``lab.sampling.Rollout``."""
    from lab.evaluate import generation_batch

    gen = torch.Generator().manual_seed(seed)
    repeated = [p for p in prompts for _ in range(samples)]
    # in batches that fit: 64 prompts × 8 samples at once would hold 512 KV caches and 512 × V logits per step
    return generate(
        policy.model,
        policy.tokenizer,
        repeated,
        max_new_tokens,
        temperature=1.0,
        generator=gen,
        batch_size=generation_batch(policy, repeated, max_new_tokens) if repeated else None,
    )


@torch.no_grad()
def sampled_kl(policy, roll, reference=None) -> float:
    """kl/ref: KL(π_θ ‖ π_ref) by the k1 estimate over completions y ~ π_θ (a rollout from ``sample_heldout``)::

        KL ≈ mean over y of  Σ_t [ log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t) ]

    (sequence level: the sum runs over the completion's tokens, eos included). ``reference``: a model to use as
    π_ref instead of ``policy.reference()``.
    """
    from contextlib import nullcontext

    from lab.ops import masked_sum
    from lab.runner import auto_microbatch

    rows = auto_microbatch(
        policy.model, len(roll), roll.completion_ids.shape[1], context_tokens=roll.prompt_ids.shape[1]
    )
    logprobs = logprobs_in_chunks(policy.model, roll, 1.0, rows)  # (B, T)
    with nullcontext(reference) if reference is not None else policy.reference() as ref:
        ref_logprobs = logprobs_in_chunks(ref, roll, 1.0, rows)  # (B, T)
    kl = masked_sum(logprobs - ref_logprobs, roll.completion_mask, dim=-1)  # (B,) k1 per sequence
    return kl.mean().item()


@torch.no_grad()
def step_kl(policy, task, cfg, prompts: list | None, seed: int) -> float:
    """The per-step ``kl/ref`` of DPO, SFT on preferred and SFT: KL(π_θ ‖ π_ref) per completion, as held out.

    The training rows' log-ratios are at hand every step, but those rows are not samples of π_θ, so their mean is
    no KL estimate. Instead, one fresh temperature-1 completion of π_θ for each of the first ``cfg.kl_prompts`` held-out
    prompts (the task's, else ``prompts``), scored by ``sampled_kl`` (k1 summed over the completion). On an
    enumerable task it is exact, over the whole vocabulary and every held-out prompt, the number ``heldout_metrics``
    logs. ``seed`` picks the samples (the step number: fresh ones each step)."""
    from lab.tasks.enumerable import kl, next_token_logprobs

    was_training = policy.model.training
    policy.model.eval()
    try:
        if task is not None and task.kind == "bandit":
            eval_prompts = task.eval_prompts()
            logprobs = next_token_logprobs(policy.model, policy.tokenizer, eval_prompts)  # (B, V)
            with policy.reference() as ref:
                ref_logprobs = next_token_logprobs(ref, policy.tokenizer, eval_prompts)  # (B, V)
            return kl(logprobs, ref_logprobs).mean().item()
        prompts = (task.eval_prompts() if task is not None else prompts)[: cfg.kl_prompts]
        roll = sample_heldout(policy, prompts, max_new_tokens=resolve_max_new_tokens(cfg, task), samples=1, seed=seed)
        return sampled_kl(policy, roll)
    finally:
        policy.model.train(was_training)


def bandit_reference(policy, task) -> torch.Tensor | None:
    """π_ref's exact next-token log-probs on the bandit prompts (B, V), for ``eval/kl_to_optimum``; None elsewhere."""
    if task is None or task.kind != "bandit":
        return None
    from lab.tasks.bandit import next_token_logprobs

    with torch.no_grad(), policy.reference() as ref:
        return next_token_logprobs(ref, policy.tokenizer, task.eval_prompts())


def sample_rows(roll: Rollout, rewards: torch.Tensor, advantages: torch.Tensor | None = None, n: int = 8) -> list[dict]:
    """The first ``n`` completions of a rollout as records for samples.jsonl."""
    rows = []
    for i in range(min(n, len(roll))):
        row = {
            "prompt": roll.prompts[i],
            "completion": roll.completions[i],
            "reward": float(rewards[i]),
            "truncated": bool(roll.truncated[i]),
        }
        if advantages is not None:
            row["advantage"] = float(advantages[i])
        rows.append(row)
    return rows
