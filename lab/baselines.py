"""Two simple ways to use preference data without RL: SFT on the preferred answers, and best-of-N sampling.

Paper card
----------
**SFT on preferred** throws the rejected answer away and imitates the chosen one (the "train on preferred
responses" baseline of the DPO paper, Rafailov et al. 2023, §6)::

    L(θ) = − E_{(x, y_w)} [ (1/|y_w|) Σ_t log π_θ(y_w,t | x, y_w,<t) ]

It uses the same loss as SFT (``lab.sft.sft_loss``); only the data differ. Nothing pushes y_l down, so the
policy learns what was preferred on average, not what made it better than the alternative.

**Best-of-N** (Stiennon et al. 2020; WebGPT, Nakano et al. 2021) trains nothing: sample N completions from
π_ref, keep the one a reward model scores highest::

    y_1, …, y_N ~ π_ref(·|x),    y = argmax_i r_φ(x, y_i)

Its distance from π_ref is known in closed form (Stiennon et al. 2020, appendix; Beirami et al. 2024 show it is
an upper bound, tight when the N samples are distinct)::

    KL(π_BoN ‖ π_ref) ≤ log N − (N − 1)/N

Both report the metric names DPO reports (``eval/gold_reward``, ``eval/sample_reward``, ``kl/ref``, and for SFT
on preferred also the implicit-reward metrics ``rewards/*`` and ``loss/dpo``, evaluated, not optimized, and
``eval/mass_off_support``), so the three can be compared side by side.

==========================  ==============================================
symbol                      code
==========================  ==============================================
y_w                         ``chosen``
N                           ``cfg.n``
r_φ                         ``scorer`` (``lab.rm.load_reward_model``)
==========================  ==============================================
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lab import dist
from lab.batching import select_pairs, token_logprobs
from lab.config import (
    ArgumentParser,
    BaseConfig,
    ConfigError,
    PreferencePolicyConfig,
    add_config_arguments,
    check,
    config_from_args,
    opt,
)
from lab.data import unique_prompts
from lab.dpo import dpo_loss
from lab.evaluate import greedy_samples, step_kl
from lab.preference import is_eval_step, setup
from lab.rollout import kl_due
from lab.runner import Run, clip_and_step, use_one_thread_for_tiny_models
from lab.sft import SFTAccumulator

# ----------------------------------------------------------------------------------------------------------------------
# SFT on the preferred answers


@dataclass
class PreferredSFTConfig(PreferencePolicyConfig):
    """Supervised fine-tuning on the chosen answers of preference pairs (the rejected ones are ignored)."""

    steps: int = opt(60, "optimizer steps", min=1, max=1_000_000)
    batch_size: int = opt(32, "preference pairs per step (their chosen answers are the targets)", min=1, max=4096)
    per_sequence: bool = opt(False, "average the loss per sequence first instead of over all completion tokens")
    beta: float = opt(
        0.1, "β of the implicit-reward metrics rewards/* and loss/dpo (reported, not optimized)", min=1e-3, max=100.0
    )


def train_preferred(
    cfg: PreferredSFTConfig, *, policy=None, stop: threading.Event | None = None, record=None
) -> Iterator[dict]:
    """One optimizer step per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    s = setup(cfg, policy)  # task, pairs, policy, optimizer, batches, ... (lab.preference)
    task, policy, micro = s.task, s.policy, s.micro

    state = (s.batches,)  # what a resumed run puts back, with the optimizer
    with Run(cfg, "sft-preferred", policy=policy, stop=stop, record=record, optimizer=s.optimizer, state=state) as run:
        s.start(run, cfg)
        for step in run.steps():
            # 1. batch: B pairs; chosen rows 0..B-1, rejected rows B..2B-1
            B, batch = s.next_batch(cfg)
            evaluating = is_eval_step(cfg, step)
            # kl/ref before this step's update, from fresh samples of π_θ (an evaluation step logs the held-out one)
            due = kl_due(step, cfg.kl_every) and not evaluating
            kl_ref = step_kl(policy, task, cfg, s.heldout_prompts, seed=cfg.seed + step) if due else None
            policy.model.train()
            tokens = dist.global_sum(batch.completion_mask[:B].sum()).clamp(min=1)  # of every process's chosen rows
            accumulator = SFTAccumulator(tokens, cfg.batch_size, cfg.per_sequence)
            pieces, ref_pieces = [], []  # (2, b) log π_θ(y|x) and log π_ref(y|x), chosen row over rejected row
            for start in range(0, B, micro):  # microbatches of b pairs
                part = select_pairs(batch, start, min(start + micro, B)).to(policy.device)
                b = part.input_ids.shape[0] // 2

                # 2. loss: SFT on the chosen half only, accumulated over the microbatches
                logprobs, mask = token_logprobs(policy.model, part)  # (2b, L-1), (2b, L-1)
                accumulator.backward(logprobs[:b], mask[:b])

                # 3. the implicit DPO rewards of this policy, for comparison with DPO (reported, not optimized)
                with torch.no_grad():
                    pieces.append((logprobs.detach() * mask).sum(-1).view(2, b))  # (2, b)
                    with policy.reference() as ref:
                        ref_logprobs, _ = token_logprobs(ref, part)  # (2b, L-1)
                    ref_pieces.append((ref_logprobs * mask).sum(-1).view(2, b))  # (2, b)
            metrics = accumulator.result()
            if kl_ref is not None:
                metrics["kl/ref"] = kl_ref

            # 4. update
            metrics["grad/norm"] = clip_and_step(s.optimizer, s.params, cfg.max_grad_norm)
            with torch.no_grad():
                sequence, ref_sequence = torch.cat(pieces, 1), torch.cat(ref_pieces, 1)  # (2, B), (2, B)
                _, implicit = dpo_loss(sequence[0], sequence[1], ref_sequence[0], ref_sequence[1], cfg.beta)
                metrics.update(implicit)
                metrics["logprobs/chosen"] = sequence[0].mean()
                metrics["logprobs/rejected"] = sequence[1].mean()

            # 5. held-out evaluation
            if evaluating:
                heldout = s.heldout(cfg)
                metrics.update(heldout)
                run.summary["after"] = heldout
            if run.want_samples(step) and task is not None:
                run.samples(step, greedy_samples(policy, task, cfg.max_new_tokens))
            yield run.log(step, metrics, tokens=int(batch.attention_mask.sum()))


# ----------------------------------------------------------------------------------------------------------------------
# best-of-N


@dataclass
class BestOfNConfig:
    """Best-of-N sampling with a reward model: no training, only sampling and scoring."""

    reward_model: str | None = opt(None, "reward model: a `python -m lab train rm` run folder or its checkpoint")
    n: int = opt(8, "N: samples per prompt; the reward model keeps the best", min=1, max=4096)
    task: str = opt(
        "reviews",
        "built-in task whose held-out prompts to answer, or your prompts: jsonl:PATH, a "
        "data file, hf:ID (then --model is required and there is no gold reward)",
    )
    model: str | None = opt(
        None, "policy to sample from (builtin name, local path, run checkpoint); default: the task's model"
    )
    temperature: float = opt(1.0, "sampling temperature", min=0.05, max=5.0)
    top_p: float = opt(1.0, "nucleus sampling threshold", min=0.01, max=1.0)
    max_new_tokens: int | None = opt(None, "completion length cap; default: the task's own", min=1, max=4096)
    rounds: int = opt(8, "best-of-N draws per held-out prompt (averaged)", min=1, max=10_000)
    eval_size: int = opt(64, "held-out prompts", min=1, max=100_000)
    seed: int = opt(0, "random seed for sampling")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        check(
            self.reward_model is not None,
            "reward_model",
            "give a reward model: the run folder of `python -m lab train rm --task TASK`",
        )
        BaseConfig._check_ranges(self)


def kl_bound(n: int) -> float:
    """log N − (N − 1)/N: the KL(π_BoN ‖ π_ref) of best-of-N (an upper bound, tight for distinct samples)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(
    policy,
    scorer,
    prompts: list,
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    task=None,
) -> list[dict]:
    """Sample ``n`` completions per prompt, keep the one ``scorer`` rates highest. One row per prompt:
    {prompt, completion, truncated, score (r_φ of the pick), mean_score (over the n samples)} and, with a
    ``task``, gold_reward of the pick and mean_gold_reward over the n samples (what a single sample gets)."""
    from lab.sampling import generate

    P = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    repeated = [p for p in prompts for _ in range(n)]  # (P·N,) the N samples of a prompt are neighbours
    roll = generate(
        policy.model, policy.tokenizer, repeated, max_new_tokens, temperature=temperature, top_p=top_p, generator=gen
    )
    truncated = roll.truncated.tolist()
    scores = scorer(roll.prompts, roll.completions, truncated).view(P, n)  # (P, N)
    best = scores.argmax(-1)  # (P,)
    gold = None
    if task is not None:
        gold = torch.tensor(task.gold_rewards(roll.prompts, roll.completions, truncated)).view(P, n)  # (P, N)
    rows = []
    for i, prompt in enumerate(prompts):
        j = i * n + int(best[i])
        row = {
            "prompt": prompt,
            "completion": roll.completions[j],
            "truncated": bool(truncated[j]),
            "score": float(scores[i, best[i]]),
            "mean_score": float(scores[i].mean()),
        }
        if gold is not None:
            row["gold_reward"] = float(gold[i, best[i]])
            row["mean_gold_reward"] = float(gold[i].mean())
        rows.append(row)
    return rows


def _load_frozen_policy(name: str, device: str):
    """A policy to sample from, with no training state and no reference copy."""
    from lab.modeling import Policy, _is_adapter_dir, load_causal_lm, load_policy, load_tokenizer, resolve_model_path

    if _is_adapter_dir(resolve_model_path(name)):
        return load_policy(name, mode="lora", device=device)
    return Policy(load_causal_lm(name, device=device), load_tokenizer(name), "full", name)


def run_best_of_n(cfg: BestOfNConfig) -> dict:
    """Held-out gold reward of best-of-N against a single sample, and the KL bound."""
    from lab.rm import load_reward_model
    from lab.rollout import OWN_DATA_MAX_NEW_TOKENS
    from lab.tasks import TASKS, get_task

    task = get_task(cfg.task) if cfg.task in TASKS else None
    if task is None:
        from lab.data import load_rows

        if cfg.model is None:
            raise ConfigError(f"model: --task {cfg.task} is your own data, so give the policy: --model ID_OR_PATH")
        prompts = unique_prompts(load_rows(cfg.task, format="prompt_only"))[: cfg.eval_size]
    else:
        prompts = task.eval_prompts()[: cfg.eval_size]
    policy = _load_frozen_policy(cfg.model or task.model, cfg.device)
    policy.model.eval()
    use_one_thread_for_tiny_models(policy)
    scorer = load_reward_model(cfg.reward_model, device=cfg.device)
    max_new = cfg.max_new_tokens or (task.max_new_tokens if task is not None else OWN_DATA_MAX_NEW_TOKENS)
    rows = best_of_n(
        policy,
        scorer,
        prompts * cfg.rounds,
        cfg.n,
        max_new_tokens=max_new,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        task=task,
    )
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    out = {
        "task": cfg.task,
        "n": cfg.n,
        "picks": len(rows),
        "rm/best": mean("score"),
        "rm/mean": mean("mean_score"),
        "kl/ref": kl_bound(cfg.n),
        "rows": rows,
    }
    if task is not None:
        out.update({"eval/gold_reward": mean("gold_reward"), "eval/sample_reward": mean("mean_gold_reward")})
    return out


def bon_main(argv: list[str] | None = None) -> int:
    """``python -m lab bon --reward-model PATH --n 8 --task reviews [--json]``."""
    parser = ArgumentParser(prog="python -m lab bon", description=BestOfNConfig.__doc__)
    add_config_arguments(parser, BestOfNConfig)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    cfg = config_from_args(BestOfNConfig, args)
    result = run_best_of_n(cfg)
    rows = result.pop("rows")
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"best-of-{cfg.n} on {cfg.task}: {result['picks']} picks ({len(rows) // cfg.rounds} held-out prompts "
        f"× {cfg.rounds} rounds), reward model {cfg.reward_model}"
    )
    if "eval/gold_reward" in result:
        print(f"  eval/gold_reward    best of {cfg.n:<4}   {result['eval/gold_reward']:.3f}")
        print(f"  eval/sample_reward  single sample  {result['eval/sample_reward']:.3f}")
    print(f"  rm score            best / mean    {result['rm/best']:.3f} / {result['rm/mean']:.3f}")
    print(f"  kl/ref              ≤ log N − (N−1)/N = {result['kl/ref']:.3f}")
    for row in rows[: min(4, len(rows))]:
        gold = f"  gold={row['gold_reward']:.2f}" if "gold_reward" in row else ""
        print(f"  {row['prompt']!r} → {row['completion']!r}  rm={row['score']:.2f}{gold}")
    return 0


__all__ = ["PreferredSFTConfig", "train_preferred", "BestOfNConfig", "best_of_n", "bon_main", "kl_bound"]
