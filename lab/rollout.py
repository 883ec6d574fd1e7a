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

from lab import dist
from lab.ops import completion_token_logprobs, completion_token_logprobs_and_entropy, masked_mean
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
        return completion_token_logprobs_and_entropy(model, roll.input_ids, roll.attention_mask, T, temperature)
    return completion_token_logprobs(model, roll.input_ids, roll.attention_mask, T, temperature)  # (B, T)


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
    # on several processes (lab.dist): the statistics of the global batch, every process's rows gathered
    rewards, lengths, truncated = dist.gather(rewards), dist.gather(lengths), dist.gather(roll.truncated.float())
    out = {
        "reward/mean": rewards.mean(),
        "reward/std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
        "completion/length": lengths.mean(),
        "completion/truncated_frac": truncated.mean(),
    }
    if correct is not None:
        correct = dist.gather(correct.to(lengths.device).float()).bool()
        if correct.any():
            out["length/correct"] = masked_mean(lengths, correct)
        if (~correct).any():
            out["length/incorrect"] = masked_mean(lengths, ~correct)
    from lab.diagnostics import diversity_metrics

    out.update(diversity_metrics(roll))  # diversity/distinct_1, diversity/distinct_2, diversity/entropy
    return out


def correct_mask(task, roll: Rollout) -> torch.Tensor | None:
    """(B,) bool: the completion earned the full gold reward, on verifiable tasks; None elsewhere."""
    if task is None or task.kind != "verifiable":
        return None
    gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
    return torch.tensor([g >= 1.0 for g in gold])


def bandit_reference(policy, task) -> torch.Tensor | None:
    """π_ref's exact next-token log-probs on the bandit prompts (B, V), for ``eval/kl_to_optimum``; None elsewhere."""
    if task is None or task.kind != "bandit":
        return None
    from lab.tasks.bandit import next_token_logprobs

    with torch.no_grad(), policy.reference() as ref:
        return next_token_logprobs(ref, policy.tokenizer, task.eval_prompts())


def sample_rows(
    roll: Rollout,
    rewards: torch.Tensor,
    advantages: torch.Tensor | None = None,
    n: int = 8,
    *,
    policy=None,
    temperature: float = 1.0,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    per_token: dict[str, torch.Tensor] | None = None,
) -> list[dict]:
    """The first ``n`` completions of a rollout as records for samples.jsonl, with what the step inspector needs.

    Every row holds ``prompt``, ``completion`` (text), ``reward`` (float: r(x, y), the score before any KL) and
    ``truncated`` (bool), plus ``advantage`` (float) when ``advantages`` is one per completion (B,).

    Given ``policy`` (call it after the step's update), every row also holds lists over the completion's real tokens
    (EOS included), all of the same length L = the row's ``completion_mask`` sum:

    ==================  ===================================================================================
    ``tokens``          each token decoded on its own (str)
    ``logprobs``        log π_old(y_t | x, y_<t): the policy that sampled (``logprobs``, (B, T) or (n, T))
    ``ref_logprobs``    log π_ref(y_t | x, y_<t), only when the step computed it
    ``logprobs_after``  log π_θ(y_t | x, y_<t) after this step's update: one no-grad forward over these n rows
    ``advantages``      Â_t: the completion's advantage on every token (REINFORCE, GRPO), or per token as given
                        (B, T) (PPO's GAE, GRPO's process advantages)
    ``<name>``          each (B, T) tensor of ``per_token`` (PPO: ``values``, ``returns``)
    ==================  ===================================================================================

    The ratio of the method's equation is exp(logprobs_after − logprobs); ε_low, ε_high (∞ with ``clip`` off) and
    β are in the run's config.json. Cost: one forward pass over n ≤ 2G rows, at the steps that log samples.
    """
    n = min(n, len(roll))
    head = roll.select(slice(0, n))
    lists: dict[str, torch.Tensor] = {}
    if policy is not None:
        was_training = policy.model.training
        policy.model.eval()  # no dropout: the same function of θ as the sampler's
        from lab.runner import auto_microbatch  # the runner sits above the rollout helpers

        rows_per_pass = auto_microbatch(
            policy.model, n, head.completion_ids.shape[1], context_tokens=head.prompt_ids.shape[1]
        )  # the same memory budget as the step's own scoring passes
        with torch.no_grad():
            lists["logprobs_after"] = logprobs_in_chunks(policy.model, head, temperature, rows_per_pass)  # (n, T)
        policy.model.train(was_training)
        if logprobs is not None:
            lists["logprobs"] = logprobs[:n]
        if ref_logprobs is not None:
            lists["ref_logprobs"] = ref_logprobs[:n]
        if advantages is not None:
            per_row = advantages[:n, None] if advantages.dim() == 1 else advantages[:n]  # (n, 1) or (n, T)
            lists["advantages"] = per_row.expand(n, head.completion_ids.shape[1])  # (n, T)
        lists.update({name: values[:n] for name, values in (per_token or {}).items()})
        tokens = decode_tokens(policy.tokenizer, head)
    rows = []
    for i in range(n):
        row = {
            "prompt": roll.prompts[i],
            "completion": roll.completions[i],
            "reward": float(rewards[i]),
            "truncated": bool(roll.truncated[i]),
        }
        if advantages is not None and advantages.dim() == 1:
            row["advantage"] = float(advantages[i])
        if policy is not None:
            length = len(tokens[i])
            row["tokens"] = tokens[i]
            row.update({name: values[i, :length].float().tolist() for name, values in lists.items()})
        rows.append(row)
    return rows


def decode_tokens(tokenizer, roll: Rollout) -> list[list[str]]:
    """Each row's real completion tokens (EOS included), each decoded on its own: B lists of strings."""
    lengths = roll.completion_mask.sum(-1).tolist()  # (B,)
    ids = roll.completion_ids.cpu().tolist()
    return [[tokenizer.decode([token]) for token in row[:length]] for row, length in zip(ids, lengths)]
