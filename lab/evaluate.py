"""The one evaluator: held-out answers scored by the gold reward, exact metrics on enumerable tasks, and kl/ref
from fresh samples. The trainers, the CLI, the notebooks and the app all read their held-out numbers from here.

    answer            generate one completion per prompt (``lab.sampling.generate``) and score it with the task
    evaluate          a task's held-out summary: ``gold_reward`` (``accuracy`` on verifiable tasks), length,
                      truncation and, on an enumerable task (``bandit``, any ``lab.tasks.EnumerableTask``), the
                      exact metrics of ``bandit_exact``, which need no sampling at all
    heldout_metrics   the same numbers under the names every trainer logs (``eval/...``, ``kl/ref``), plus
                      sampled ``eval/sample_reward`` and ``kl/ref`` for the methods that never sample in training
    step_kl           the per-step ``kl/ref`` of those methods (DPO, SFT on preferred, SFT)
    before_after      the reference and the tuned policy side by side
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lab.ops import masked_sum
from lab.rollout import bandit_reference, logprobs_in_chunks, resolve_max_new_tokens, score
from lab.runner import auto_generation_batch, auto_microbatch
from lab.sampling import Rollout, encode_prompt, format_prompt, generate


@dataclass
class Answers:
    prompts: list[str]
    completions: list[str]
    rewards: list[float]
    truncated: list[bool]
    roll: Rollout | None = None  # the generated tokens, for scoring the same answers again


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
    return Answers(roll.prompts, roll.completions, [float(r) for r in rewards], truncated, roll)


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
    beta: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    support: dict[str, set[str]] | None = None,
    calibrate: bool = False,
) -> dict:
    """Score a policy on ``n`` held-out prompts of ``task`` (all of them when ``n`` is None); on an enumerable task
    also its exact metrics (``bandit_exact``, with ``beta``, ``ref_logprobs`` and ``support`` passed on); with
    ``calibrate`` on a verifiable task, ``ece``: the expected calibration error of these same answers
    (``lab.diagnostics``)."""
    model = getattr(policy_or_model, "model", policy_or_model)
    tokenizer = tokenizer or policy_or_model.tokenizer
    prompts = task.eval_prompts() if split == "eval" else task.train_prompts()
    prompts = prompts[:n] if n else prompts
    answers = answer(model, tokenizer, task, prompts, greedy=greedy, max_new_tokens=max_new_tokens, seed=seed)
    result = summarize(task, answers)
    if calibrate and task.kind == "verifiable":
        from lab.diagnostics import expected_calibration_error, rollout_confidences

        result["ece"] = expected_calibration_error(*rollout_confidences(model, answers.roll, task))
    if task.kind == "bandit":
        result.update(bandit_exact(model, tokenizer, task, beta, ref_logprobs, support))
    return result


@torch.no_grad()
def bandit_exact(model, tokenizer, task, beta: float | None = None, ref_logprobs=None, support=None) -> dict:
    """Exact metrics of an enumerable task (``lab.tasks.EnumerableTask``: the built-in ``bandit`` or one you
    declared) over its held-out prompts: ``exact_reward`` = E_π[r]; given π_ref's (B, V) next-token
    ``ref_logprobs``, ``kl_ref`` = KL(π_θ‖π_ref) and, with ``beta`` too, ``kl_to_optimum`` = KL(π*‖π_θ); given
    ``support`` (prompt -> responses seen in training pairs) also ``mass_off_support`` and
    ``kl_to_optimum_support`` (``lab.tasks.enumerable.exact_metrics``)."""
    from lab.tasks.enumerable import exact_metrics, next_token_logprobs, support_mask

    prompts = task.eval_prompts()
    logprobs = next_token_logprobs(model, tokenizer, prompts)  # (B, V)
    rewards = task.reward_tables(prompts, tokenizer).to(logprobs)  # (B, V)
    mask = support_mask(prompts, support, tokenizer) if support is not None else None
    return exact_metrics(logprobs, rewards, ref_logprobs, beta, mask)


# the exact metrics of an enumerable task, under the names the trainers log
EXACT_NAMES = {
    "exact_reward": "eval/exact_reward",
    "kl_ref": "eval/kl_ref",
    "kl_to_optimum": "eval/kl_to_optimum",
    "kl_to_optimum_support": "eval/kl_to_optimum_support",
    "mass_off_support": "eval/mass_off_support",
}


@torch.no_grad()
def heldout_metrics(
    policy,
    task,
    n: int,
    beta: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    kl_ref: bool = False,
    samples: int = 0,
    prompts: list | None = None,
    support: dict[str, set[str]] | None = None,
    fixed_point: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> dict:
    """What every trainer logs about the held-out prompts, one name per quantity:

    * ``eval/accuracy`` (verifiable tasks) or ``eval/gold_reward``: greedy answers to ``n`` held-out prompts of
      ``task``, scored by its gold reward;
    * on an enumerable task, exact over the vocabulary: ``eval/exact_reward`` = E_π[r]; ``eval/kl_to_optimum`` =
      KL(π*‖π_θ) for π* = π_ref·exp(r/β)/Z, given ``beta`` and π_ref; with ``support`` (prompt -> the responses
      seen as chosen or rejected in training pairs, ``pair_support``) ``eval/mass_off_support``, the probability
      of a response no pair holds (the mass a preference loss moves without seeing it), and
      ``eval/kl_to_optimum_support``, the same KL with both renormalized over the support; given the log-probs of
      a method's own fixed point (B, V), ``eval/kl_to_fixed_point`` = KL(π_fixed‖π_θ) (lab.fixed_points);
    * ``kl/ref`` when ``kl_ref``: exact on an enumerable task, else the k1 estimate over ``samples`` fresh
      temperature-1 completions of each held-out prompt (``sampled_kl``);
    * elsewhere, with ``samples``: ``eval/sample_reward``, the gold reward of those samples, and with ``support``
      the share of them equal to no chosen/rejected response of their prompt (over the held-out prompts that
      appear in the pairs; absent when none do; on free text nearly every sample is new, so ≈ 1 says little).

    ``ref_logprobs``: π_ref's next-token log-probs on an enumerable task's prompts (``bandit_reference``); taken
    from ``policy.reference()`` when ``kl_ref`` asks for them. ``prompts``: held-out prompts to sample when there
    is no task (your own data)."""
    was_training = policy.model.training
    policy.model.eval()
    try:
        out: dict = {}
        if task is not None:
            if task.kind == "bandit" and kl_ref and ref_logprobs is None:
                ref_logprobs = bandit_reference(policy, task)
            result = evaluate(
                policy, task, n=n, max_new_tokens=max_new_tokens, beta=beta, ref_logprobs=ref_logprobs,
                support=support, calibrate=True,
            )  # fmt: skip
            out["eval/accuracy" if task.kind == "verifiable" else "eval/gold_reward"] = result["gold_reward"]
            out.update({name: result[key] for key, name in EXACT_NAMES.items() if key in result})
            if kl_ref and "kl_ref" in result:
                out["kl/ref"] = result["kl_ref"]
            if fixed_point is not None:
                from lab.fixed_points import kl_to_fixed_point

                out["eval/kl_to_fixed_point"] = kl_to_fixed_point(policy.model, policy.tokenizer, task, fixed_point)
            if "ece" in result:  # of the greedy answers just scored: no second generation
                out["eval/ece"] = result["ece"]
            if task.kind == "bandit":
                from lab.diagnostics import calibration_metrics

                out.update(calibration_metrics(policy, task, n, beta, ref_logprobs))  # eval/ece_to_optimum
        if samples and (task is None or task.kind != "bandit") and (prompts or task is not None):
            out.update(
                _sampled_metrics(
                    policy, task, prompts or task.eval_prompts()[:n], kl_ref, samples, support, max_new_tokens, seed
                )
            )
        return out
    finally:
        policy.model.train(was_training)


def _sampled_metrics(policy, task, prompts, kl_ref, samples, support, max_new_tokens, seed) -> dict:
    """``eval/sample_reward``, ``kl/ref`` and ``eval/mass_off_support`` from ``samples`` completions per prompt."""
    max_new_tokens = max_new_tokens or task.max_new_tokens  # own data: the caller resolves it (resolve_max_new_tokens)
    roll = sample_heldout(policy, prompts, max_new_tokens=max_new_tokens, samples=samples, seed=seed)
    from lab.diagnostics import diversity_metrics

    out = diversity_metrics(roll)  # diversity/*, over the samples of each held-out prompt
    if task is not None:
        gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
        out["eval/sample_reward"] = sum(gold) / len(gold)
    if kl_ref:
        out["kl/ref"] = sampled_kl(policy, roll)
    if support is not None:
        off = sampled_off_support(roll.prompts, roll.completions, support)
        if off is not None:
            out["eval/mass_off_support"] = off
    return out


def preference_heldout(policy, task, cfg, *, use_reference: bool = True, prompts=None, support=None) -> dict:
    """``heldout_metrics`` of the methods trained on fixed data (DPO, SFT on preferred), from their config:
    ``cfg.eval_size`` prompts, ``cfg.beta``, ``cfg.kl_samples`` samples per prompt, ``cfg.max_new_tokens``,
    ``cfg.seed``; ``kl/ref`` only when ``use_reference`` (π_θ = π_ref before the first step; SimPO has no π_ref)."""
    return heldout_metrics(
        policy,
        task,
        cfg.eval_size,
        cfg.beta,
        kl_ref=use_reference,
        samples=cfg.kl_samples,
        prompts=prompts,
        support=support,
        max_new_tokens=resolve_max_new_tokens(cfg, task),
        seed=cfg.seed,
    )


def sampled_off_support(prompts: list, completions: list[str], support: dict[str, set[str]]) -> float | None:
    """Share of sampled completions equal to no chosen/rejected response of their prompt (compared without
    surrounding whitespace), among the samples whose prompt appears in ``support``; None when none does."""
    seen = {prompt: {text.strip() for text in texts} for prompt, texts in support.items()}
    off = [
        completion.strip() not in seen[str(prompt)]
        for prompt, completion in zip(prompts, completions)
        if str(prompt) in seen
    ]
    return sum(off) / len(off) if off else None


def greedy_samples(policy, task, max_new_tokens: int | None = None, n: int = 4) -> list[dict]:
    """The greedy answers to the first ``n`` held-out prompts, as records for samples.jsonl."""
    ans = answer(policy.model, policy.tokenizer, task, task.eval_prompts()[:n], max_new_tokens=max_new_tokens)
    return [
        {"prompt": p, "completion": c, "gold_reward": r} for p, c, r in zip(ans.prompts, ans.completions, ans.rewards)
    ]


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


# ----------------------------------------------------------------------------------------------------------------------
# kl/ref of the methods that do not sample: fresh completions of π_θ (DPO, SFT on preferred, SFT)


@torch.no_grad()
def sample_heldout(policy, prompts: list[str], *, max_new_tokens: int, samples: int = 8, seed: int = 0):
    """``samples`` temperature-1 completions per held-out prompt from π_θ: a ``lab.sampling.Rollout``."""
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
    no KL estimate. Instead, one fresh temperature-1 completion of π_θ for each of the first ``cfg.kl_prompts``
    held-out prompts (the task's, else ``prompts``), scored by ``sampled_kl`` (k1 summed over the completion). On an
    enumerable task it is exact, over the whole vocabulary and every held-out prompt, the number ``heldout_metrics``
    logs. ``seed`` picks the samples (the step number: fresh ones each step)."""
    from lab.tasks.enumerable import kl, next_token_logprobs

    was_training = policy.model.training
    policy.model.eval()
    try:
        if task is not None and task.kind == "bandit":
            logprobs = next_token_logprobs(policy.model, policy.tokenizer, task.eval_prompts())  # (B, V)
            return kl(logprobs, bandit_reference(policy, task)).mean().item()
        prompts = (task.eval_prompts() if task is not None else prompts)[: cfg.kl_prompts]
        roll = sample_heldout(policy, prompts, max_new_tokens=resolve_max_new_tokens(cfg, task), samples=1, seed=seed)
        return sampled_kl(policy, roll)
    finally:
        policy.model.train(was_training)
