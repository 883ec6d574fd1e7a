"""Held-out evaluation and before/after comparison, shared by the CLI, the trainers, the notebooks and the app.

``evaluate`` answers the held-out prompts of a task (greedy by default) and scores them with the task's gold
reward: ``accuracy`` for verifiable tasks (the gold reward is 0/1), ``gold_reward`` for graded ones. On an
enumerable task (``bandit``, or any ``lab.tasks.EnumerableTask``) it also reports the exact expected reward and
KL(π*‖π_θ), which need no sampling at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.sampling import generate


@dataclass
class Answers:
    prompts: list[str]
    completions: list[str]
    rewards: list[float]
    truncated: list[bool]


@torch.no_grad()
def answer(
    model,
    tokenizer,
    task,
    prompts: list[str],
    *,
    greedy: bool = True,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> Answers:
    """Generate one completion per prompt and score it with the task's gold reward."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    roll = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens or task.max_new_tokens,
        temperature=temperature,
        greedy=greedy,
        generator=gen,
        batch_size=batch_size,
    )
    truncated = [bool(t) for t in roll.truncated.tolist()]
    rewards = task.gold_rewards(roll.prompts, roll.completions, truncated)
    return Answers(roll.prompts, roll.completions, [float(r) for r in rewards], truncated)


def summarize(task, answers: Answers) -> dict:
    """The task's headline metric plus mean completion length (in words for text, characters for arith)."""
    n = max(len(answers.rewards), 1)
    mean_reward = sum(answers.rewards) / n
    out = {
        "n": len(answers.rewards),
        "gold_reward": mean_reward,
        "truncated_frac": sum(answers.truncated) / n,
        "length": sum(len(c.split()) if " " in c else len(c) for c in answers.completions) / n,
    }
    if task.kind == "verifiable":
        out["accuracy"] = mean_reward
    return out


def evaluate(
    policy_or_model,
    task,
    *,
    n: int | None = None,
    greedy: bool = True,
    split: str = "eval",
    tokenizer=None,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> dict:
    """Score a policy on ``n`` held-out prompts of ``task`` (all of them when ``n`` is None)."""
    model = getattr(policy_or_model, "model", policy_or_model)
    tokenizer = tokenizer or policy_or_model.tokenizer
    prompts = task.eval_prompts() if split == "eval" else task.train_prompts()
    prompts = prompts[:n] if n else prompts
    answers = answer(model, tokenizer, task, prompts, greedy=greedy, max_new_tokens=max_new_tokens, seed=seed)
    result = summarize(task, answers)
    if task.kind == "bandit":
        result.update(bandit_exact(model, tokenizer, task))
    return result


@torch.no_grad()
def bandit_exact(model, tokenizer, task, beta: float | None = None, ref_logprobs=None, support=None) -> dict:
    """Exact metrics of an enumerable task (``lab.tasks.EnumerableTask``: the built-in ``bandit`` or one you
    declared) over its held-out prompts: ``exact_reward`` = E_π[r] and, given ``beta`` and π_ref's (B, V)
    next-token ``ref_logprobs``, ``kl_to_optimum`` = KL(π*‖π_θ); given ``support`` (prompt -> responses seen in
    training pairs) also ``mass_off_support`` and ``kl_to_optimum_support``
    (``lab.tasks.enumerable.exact_metrics``)."""
    from lab.tasks.enumerable import exact_metrics, next_token_logprobs, support_mask

    prompts = task.eval_prompts()
    logprobs = next_token_logprobs(model, tokenizer, prompts)  # (B, V)
    rewards = task.reward_tables(prompts, tokenizer).to(logprobs)  # (B, V)
    mask = support_mask(prompts, support, tokenizer) if support is not None else None
    out = exact_metrics(logprobs, rewards, ref_logprobs if beta is not None else None, beta, mask)
    out.pop("kl_ref", None)
    return out


def before_after(
    policy, task, prompts: list[str] | None = None, n: int = 8, greedy: bool = True, seed: int = 0
) -> list[dict]:
    """The same prompts answered by the reference (adapters off) and by the tuned policy, side by side."""
    prompts = prompts or task.eval_prompts()[:n]
    with policy.reference() as ref:
        before = answer(ref, policy.tokenizer, task, prompts, greedy=greedy, seed=seed)
    after = answer(policy.model, policy.tokenizer, task, prompts, greedy=greedy, seed=seed)
    return [
        {"prompt": p, "before": b, "before_reward": rb, "after": a, "after_reward": ra}
        for p, b, rb, a, ra in zip(prompts, before.completions, before.rewards, after.completions, after.rewards)
    ]


def generation_batch(policy, prompts: list, max_new_tokens: int) -> int:
    """How many of ``prompts`` one sampling batch holds within memory: their KV caches (longest prompt plus
    ``max_new_tokens``) and next-token logits (``lab.runner.auto_generation_batch``)."""
    from lab.runner import auto_generation_batch
    from lab.sampling import encode_prompt, format_prompt

    longest = max(len(encode_prompt(policy.tokenizer, format_prompt(policy.tokenizer, p))) for p in prompts)
    return auto_generation_batch(policy.model, len(prompts), longest + max_new_tokens)


@torch.no_grad()
def evaluate_prompts(
    policy,
    prompts: list,
    reward_fn=None,
    columns: dict[str, list] | None = None,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    seed: int = 0,
) -> dict:
    """Answer your own prompts (strings or chat messages) and score them with any reward function (``math``, a
    reward model, python:module:function); the prompts' extra ``columns`` (an ``answer``) go to the reward as in
    training. Returns ``n``, ``reward/mean`` (when a reward is given), ``truncated_frac``, ``length`` (tokens)
    and the answers themselves under ``rows``."""
    from lab.rollout import score

    gen = torch.Generator(device=policy.device).manual_seed(seed)
    roll = generate(
        policy.model,
        policy.tokenizer,
        list(prompts),
        max_new_tokens,
        greedy=greedy,
        generator=gen,
        batch_size=generation_batch(policy, prompts, max_new_tokens),
    )
    lengths = roll.completion_mask.sum(-1).float()  # (B,)
    out = {"n": len(roll), "truncated_frac": float(roll.truncated.float().mean()), "length": float(lengths.mean())}
    rewards = score(reward_fn, roll, columns) if reward_fn is not None else None
    if rewards is not None:
        out["reward/mean"] = float(rewards.mean())
    out["rows"] = [
        {
            "prompt": p,
            "completion": c,
            "truncated": bool(t),
            **({"reward": float(rewards[i])} if rewards is not None else {}),
        }
        for i, (p, c, t) in enumerate(zip(roll.prompts, roll.completions, roll.truncated.tolist()))
    ]
    return out
