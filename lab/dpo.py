"""Direct Preference Optimization (DPO) and three variants: length-normalized DPO, SimPO and IPO.

Paper card
----------
The KL-regularized RLHF objective (InstructGPT, Ouyang et al. 2022)::

    max_π  E_{y~π(·|x)}[ r(x, y) ] − β · KL( π(·|x) ‖ π_ref(·|x) )

has the closed-form optimum π*(y|x) = π_ref(y|x) · exp(r(x, y)/β) / Z(x). Solved for the reward,
r(x, y) = β log π*(y|x)/π_ref(y|x) + β log Z(x), and β log Z(x) cancels in a Bradley–Terry comparison
σ(r(y_w) − r(y_l)). DPO (Rafailov et al. 2023) therefore fits the policy itself to the preference pairs::

    L_DPO(θ) = − E_{(x, y_w, y_l)} [ log σ( β log π_θ(y_w|x)/π_ref(y_w|x) − β log π_θ(y_l|x)/π_ref(y_l|x) ) ]

No reward model, no sampling: two forward passes (policy and reference) per pair. Its gradient scales
each pair by how wrong the implicit reward r̂(y) = β log π_θ(y|x)/π_ref(y|x) still is::

    ∇L = − β σ(−β Δ) [ ∇ log π_θ(y_w|x) − ∇ log π_θ(y_l|x) ],   Δ = log-ratio(y_w) − log-ratio(y_l)

Variants, one small function each, picked by ``cfg.loss_type`` through the ``LOSSES`` table:

==================  =========================================================  ==============================
loss_type           per-pair loss                                              paper
==================  =========================================================  ==============================
sigmoid             − log σ(β Δ)                                               DPO, Rafailov et al. 2023
length_normalized   − log σ(β [ρ_w/|y_w| − ρ_l/|y_l|]),  ρ = log-ratio        Tulu 3, Lambert et al. 2024
simpo               − log σ(β/|y_w| log π_θ(y_w) − β/|y_l| log π_θ(y_l) − γ)   SimPO, Meng et al. 2024
ipo                 (ρ_w/|y_w| − ρ_l/|y_l| − 1/(2β))²                          IPO, Azar et al. 2023
==================  =========================================================  ==============================

SimPO has no reference policy at all: it never calls ``policy.reference()`` and, in full mode, never
loads the frozen copy. With γ = 0 its Bradley–Terry fit makes π_θ(y) ∝ exp(r(y)/β) (per token) among the
answers in the data, whatever π_ref was; DPO's fit is π_ref · exp(r/β) instead (tests/test_dpo.py checks
both on the bandit task).

==========================  ==============================================
symbol                      code
==========================  ==============================================
x, y_w, y_l                 ``prompt``, ``chosen``, ``rejected``
log π_θ(y_w|x)              ``logprobs_chosen`` (B,)
log π_ref(y_w|x)            ``ref_logprobs_chosen`` (B,)
|y_w|                       ``chosen_lengths`` (B,) completion tokens
β                           ``cfg.beta``
γ                           ``cfg.simpo_gamma``
ε (label noise)             ``cfg.label_smoothing`` (conservative DPO)
r̂(y_w) = β log-ratio        metric ``rewards/chosen``
==========================  ==============================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lab.batching import PairBatch, sequence_logprob
from lab.config import BaseConfig, check, opt
from lab.data import unique_prompts
from lab.rollout import kl_due, sample_heldout, sampled_kl, step_kl
from lab.runner import (
    MetricAccumulator,
    Run,
    auto_microbatch,
    clip_and_step,
    load_for,
    make_optimizer,
    seed_everything,
    shuffled_batches,
    use_one_thread_for_tiny_models,
)

LOSS_TYPES = ("sigmoid", "length_normalized", "simpo", "ipo")
# β means different things per loss (a KL weight on summed or per-token log-ratios, a reward scale for SimPO),
# so its default follows the loss: 0.1 for DPO (Rafailov et al.), 5 for length-normalized DPO (Tulu 3), 2 for SimPO
# (Meng et al. use 2–10), and 0.5 for IPO, whose per-token log-ratio margin is pulled to 1/(2β) = 1 nat.
DEFAULT_BETA = {"sigmoid": 0.1, "length_normalized": 5.0, "simpo": 2.0, "ipo": 0.5}


@dataclass
class DPOConfig(BaseConfig):
    """Direct preference optimization (DPO, length-normalized DPO, SimPO, IPO) on preference pairs."""

    task: str = opt(
        "reviews",
        "built-in task with preference pairs (reviews, bandit) or jsonl:PATH / hf:ID of "
        "{prompt, chosen, rejected} rows",
    )
    loss_type: str = opt(
        "sigmoid", "sigmoid (DPO), length_normalized (Tulu 3), simpo (no reference), ipo", choices=LOSS_TYPES
    )
    beta: float | None = opt(
        None,
        "β: KL strength (sigmoid, length_normalized, ipo) or reward scale (simpo); default 0.1, 5, 2, 0.5 by loss_type",
        min=1e-3,
        max=100.0,
    )
    simpo_gamma: float = opt(0.5, "γ: SimPO's target reward margin (simpo only)", min=0.0, max=20.0)
    label_smoothing: float = opt(
        0.0,
        "ε: assumed probability that a label is flipped (conservative DPO); sigmoid, length_normalized and simpo",
        min=0.0,
        max=0.49,
    )
    # 60 steps × 32 pairs is just under one pass over reviews' 2,000 pairs: a second pass overfits and the
    # policy collapses into word salad (kl/ref jumps from ~1 to >10 nats).
    lr: float | None = opt(
        None,
        "AdamW learning rate; default: 3e-4 on the built-in models, 2e-5 (LoRA/QLoRA) or 1e-6 (full) on your own",
        min=1e-7,
        max=1.0,
        builtin=3e-4,
    )
    steps: int = opt(60, "optimizer steps", min=1, max=1_000_000)
    batch_size: int = opt(32, "preference pairs per step", min=1, max=4096)
    max_length: int = opt(256, "truncate prompt+completion to this many tokens (prompt cut first)", min=2, max=65536)
    eval_every: int = opt(
        0, "held-out kl/ref and eval/gold_reward every N steps (0: at the end only)", min=0, max=1_000_000
    )
    kl_samples: int = opt(8, "completions sampled per held-out prompt for the kl/ref estimate", min=1, max=1024)
    # the pairs are not samples of π_θ, so between evaluations kl/ref needs fresh ones: kl_prompts generations and
    # two no-grad passes over them every kl_every steps (a few % of a step on the built-in models; more on long
    # completions of a large model, where kl_every 10 or 0 keeps the cost down)
    kl_every: int = opt(
        1,
        "log kl/ref every N steps, from one fresh sample of π_θ on each of kl_prompts held-out "
        "prompts, before the step's update (0: at evaluations only)",
        min=0,
        max=1_000_000,
    )
    kl_prompts: int = opt(8, "held-out prompts sampled (one completion each) for the per-step kl/ref", min=1, max=4096)
    microbatch_size: int | None = opt(
        None,
        "pairs per forward/backward (gradients accumulate over the batch); "
        "default: the most that fit in memory (LAB_MICROBATCH_GB)",
        min=1,
        max=4096,
    )

    def __post_init__(self) -> None:
        check(
            self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
        )
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.loss_type]
        super().__post_init__()  # ranges, including beta's
        check(
            self.label_smoothing == 0.0 or self.loss_type != "ipo",
            "label_smoothing",
            "is not defined for ipo (a squared loss has no label to smooth); set it to 0 or use sigmoid",
        )
        check(self.task != "arith", "task", "arith has no preference pairs; use reviews, bandit or jsonl:PATH")


# ----------------------------------------------------------------------------------------------------------------------
# losses: pure functions, tensors in, (loss, metrics) out


def _bradley_terry_nll(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z) per pair: the negative log-likelihood of the label under Bradley–Terry,
    when a fraction ε of labels are assumed flipped (ε = 0: plain logistic loss). (B,) -> (B,)"""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _pair_metrics(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """The metrics every preference loss reports, from its implicit rewards (B,)."""
    with torch.no_grad():
        margin = chosen_rewards - rejected_rewards  # (B,)
        return {
            "loss/dpo": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": margin.mean(),
            "rewards/accuracy": (margin > 0).float().mean(),
        }


def dpo_loss(
    logprobs_chosen: torch.Tensor,
    logprobs_rejected: torch.Tensor,
    ref_logprobs_chosen: torch.Tensor,
    ref_logprobs_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
):
    """DPO (Rafailov et al. 2023, eq. 7), with conservative label smoothing ε (Mitchell 2023):

        r̂_w = β (log π_θ(y_w|x) − log π_ref(y_w|x)),   r̂_l = β (log π_θ(y_l|x) − log π_ref(y_l|x))
        L   = mean_B [ −(1−ε) log σ(r̂_w − r̂_l) − ε log σ(r̂_l − r̂_w) ]

    All inputs (B,) sequence log-probs (summed over completion tokens). Returns (loss, metrics).
    """
    chosen_rewards = beta * (logprobs_chosen - ref_logprobs_chosen)  # (B,)
    rejected_rewards = beta * (logprobs_rejected - ref_logprobs_rejected)  # (B,)
    loss = _bradley_terry_nll(chosen_rewards - rejected_rewards, label_smoothing).mean()
    return loss, _pair_metrics(loss, chosen_rewards, rejected_rewards)


def length_normalized_dpo_loss(
    logprobs_chosen: torch.Tensor,
    logprobs_rejected: torch.Tensor,
    ref_logprobs_chosen: torch.Tensor,
    ref_logprobs_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
):
    """Length-normalized DPO (Tulu 3, Lambert et al. 2024): each log-ratio is divided by its completion length,
    so a long answer cannot win on the sum of many small per-token gains::

        r̂_w = β (log π_θ(y_w|x) − log π_ref(y_w|x)) / |y_w|,   r̂_l likewise with |y_l|
        L   = mean_B [ −(1−ε) log σ(r̂_w − r̂_l) − ε log σ(r̂_l − r̂_w) ]

    Log-probs (B,) summed over tokens; lengths (B,) completion token counts. Returns (loss, metrics).
    """
    chosen_rewards = beta * (logprobs_chosen - ref_logprobs_chosen) / chosen_lengths.clamp(min=1)  # (B,)
    rejected_rewards = beta * (logprobs_rejected - ref_logprobs_rejected) / rejected_lengths.clamp(min=1)  # (B,)
    loss = _bradley_terry_nll(chosen_rewards - rejected_rewards, label_smoothing).mean()
    return loss, _pair_metrics(loss, chosen_rewards, rejected_rewards)


def simpo_loss(
    avg_logprobs_chosen: torch.Tensor,
    avg_logprobs_rejected: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
):
    """SimPO (Meng et al. 2024, eq. 6): the implicit reward is the policy's own per-token log-likelihood, with no
    reference model, and the Bradley–Terry comparison must clear a margin γ::

        r̂_w = β/|y_w| · log π_θ(y_w|x),   r̂_l = β/|y_l| · log π_θ(y_l|x)
        L   = mean_B [ −(1−ε) log σ(r̂_w − r̂_l − γ) − ε log σ(γ − r̂_w + r̂_l) ]

    Inputs (B,) per-token average log-probs. Returns (loss, metrics).
    """
    chosen_rewards = beta * avg_logprobs_chosen  # (B,)
    rejected_rewards = beta * avg_logprobs_rejected  # (B,)
    loss = _bradley_terry_nll(chosen_rewards - rejected_rewards - gamma, label_smoothing).mean()
    return loss, _pair_metrics(loss, chosen_rewards, rejected_rewards)


def ipo_loss(
    logprobs_chosen: torch.Tensor,
    logprobs_rejected: torch.Tensor,
    ref_logprobs_chosen: torch.Tensor,
    ref_logprobs_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
):
    """IPO (Azar et al. 2023, eq. 17; β is the paper's τ): regress the log-ratio margin onto 1/(2β) instead of
    pushing it to infinity, so deterministic preferences cannot drive the policy arbitrarily far from π_ref::

        h = (log π_θ(y_w|x) − log π_ref(y_w|x)) / |y_w| − (log π_θ(y_l|x) − log π_ref(y_l|x)) / |y_l|
        L = mean_B [ (h − 1/(2β))² ]

    The per-token averages in h follow TRL, whose source notes that the IPO authors confirmed this normalized
    form is what their reported results use; pass lengths of 1 for the paper's summed form.
    Reported rewards: r̂ = β · (per-token log-ratio). Returns (loss, metrics).
    """
    chosen_ratio = (logprobs_chosen - ref_logprobs_chosen) / chosen_lengths.clamp(min=1)  # (B,)
    rejected_ratio = (logprobs_rejected - ref_logprobs_rejected) / rejected_lengths.clamp(min=1)  # (B,)
    loss = ((chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _pair_metrics(loss, beta * chosen_ratio, beta * rejected_ratio)


@dataclass
class PairLogprobs:
    """What any preference loss may need for a batch of B pairs, all (B,)."""

    chosen: torch.Tensor  # log π_θ(y_w|x), summed over tokens
    rejected: torch.Tensor  # log π_θ(y_l|x)
    chosen_lengths: torch.Tensor  # |y_w| in tokens
    rejected_lengths: torch.Tensor  # |y_l|
    ref_chosen: torch.Tensor | None = None  # log π_ref(y_w|x); None for simpo
    ref_rejected: torch.Tensor | None = None


# loss_type -> how to call its loss. One entry per variant: a new variant is a new function and a new line here.
LOSSES: dict[str, Callable[[PairLogprobs, DPOConfig], tuple]] = {
    "sigmoid": lambda p, cfg: dpo_loss(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, cfg.beta, cfg.label_smoothing
    ),
    "length_normalized": lambda p, cfg: length_normalized_dpo_loss(
        p.chosen,
        p.rejected,
        p.ref_chosen,
        p.ref_rejected,
        p.chosen_lengths,
        p.rejected_lengths,
        cfg.beta,
        cfg.label_smoothing,
    ),
    "simpo": lambda p, cfg: simpo_loss(
        p.chosen / p.chosen_lengths.clamp(min=1),
        p.rejected / p.rejected_lengths.clamp(min=1),
        cfg.beta,
        cfg.simpo_gamma,
        cfg.label_smoothing,
    ),
    "ipo": lambda p, cfg: ipo_loss(
        p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.chosen_lengths, p.rejected_lengths, cfg.beta
    ),
}
USES_REFERENCE = {"sigmoid": True, "length_normalized": True, "simpo": False, "ipo": True}


# ----------------------------------------------------------------------------------------------------------------------
# data and batches


def load_preference_rows(cfg, split: str = "train") -> list[dict]:
    """{prompt, chosen, rejected, ...} rows of ``cfg.task`` (a built-in task's pairs, or a file / hub dataset)."""
    from lab.data import load_rows

    return list(load_rows(cfg.task, format="preference", split=split, skip_bad_rows=cfg.skip_bad_rows))


def ends_with_eos(task) -> bool:
    """Whether completions are scored with their eos. A bandit response is exactly one token and the episode
    ends without eos, so its log π(y|x) is that one token's log-prob."""
    return task is None or task.kind != "bandit"


def encode_preference_batch(tokenizer, rows: list[dict], max_length: int, add_eos: bool = True) -> PairBatch:
    """Chosen rows 0..B-1, rejected rows B..2B-1 of one right-padded batch, so one forward pass scores both.

    A completion the data marks as truncated (``chosen_truncated``: it hit the length cap) never emitted eos,
    so it is scored without one."""
    from lab.rm import encode_completions

    prompts = [r["prompt"] for r in rows]
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    ended = [add_eos and not r.get("chosen_truncated", False) for r in rows]
    ended += [add_eos and not r.get("rejected_truncated", False) for r in rows]
    return encode_completions(tokenizer, prompts + prompts, completions, ended, max_length=max_length)


def select_pairs(batch: PairBatch, start: int, stop: int) -> PairBatch:
    """Pairs start..stop-1 of a batch from ``encode_preference_batch`` (chosen rows first, then rejected), still
    chosen-then-rejected, with the columns that are padding in every kept row cut off. Naive equivalent:
    ``encode_preference_batch`` of ``rows[start:stop]``."""
    B = batch.input_ids.shape[0] // 2
    return batch.select(torch.cat([torch.arange(start, stop), torch.arange(B + start, B + stop)]))  # 2b rows


def pair_microbatch(cfg, policy) -> int:
    """``cfg.microbatch_size``, or the most pairs (2 sequences of up to ``max_length`` tokens each) per
    forward/backward that fit in memory."""
    return cfg.microbatch_size or auto_microbatch(policy.model, cfg.batch_size, 2 * cfg.max_length)


def pair_logprobs(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs_chosen, logprobs_rejected, chosen_lengths, rejected_lengths), each (B,), from one forward pass
    over a batch built by ``encode_preference_batch``."""
    logprobs, lengths = sequence_logprob(model, batch)  # (2B,), (2B,)
    chosen, rejected = logprobs.chunk(2)  # (B,), (B,)
    chosen_lengths, rejected_lengths = lengths.chunk(2)  # (B,), (B,)
    return chosen, rejected, chosen_lengths, rejected_lengths


def _load_policy(cfg: DPOConfig, task, prompts: list | None = None):
    """The policy to train. SimPO in full mode gets no frozen reference copy: it never uses one."""
    if cfg.mode != "full" or USES_REFERENCE[cfg.loss_type]:
        return load_for(cfg, task, prompts)
    from lab.modeling import Policy, enable_gradient_checkpointing, load_causal_lm, load_tokenizer
    from lab.runner import check_prompts_fit_tokenizer

    name = cfg.model or (task.model if task is not None else None)
    if name is None:
        raise ValueError("a data source that is not a built-in task needs --model")
    tokenizer = load_tokenizer(name, cfg.trust_remote_code)
    check_prompts_fit_tokenizer(prompts or [], tokenizer, name)  # before the model loads, as in load_for
    model = load_causal_lm(name, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    policy = Policy(model, tokenizer, "full", name, ref_model=None)
    use_one_thread_for_tiny_models(policy)
    return policy


# ----------------------------------------------------------------------------------------------------------------------
# held-out metrics (also used by lab.baselines and scripts/preference_table.py)


@torch.no_grad()
def heldout_metrics(
    policy,
    task,
    cfg,
    *,
    use_reference: bool = True,
    prompts: list[str] | None = None,
    support: dict[str, set[str]] | None = None,
) -> dict:
    """Held-out ``eval/gold_reward`` (greedy answers, where the task has a gold reward), ``eval/sample_reward``
    (gold reward of temperature-1 samples) and ``kl/ref`` (only when ``use_reference``).

    ``support`` (prompt -> the responses seen as chosen or rejected in the training pairs, ``pair_support``)
    adds ``eval/mass_off_support``, the probability of a response that no training pair holds: the mass a
    preference loss moves without ever seeing it (likelihood displacement).

    On an enumerable task (``lab.tasks.EnumerableTask``, such as ``bandit``) every number is exact, over the
    vocabulary: expected reward, KL(π_θ‖π_ref), ``eval/kl_to_optimum`` = KL(π*‖π_θ) for π* = π_ref·exp(r/β)/Z
    with ``cfg.beta``, ``eval/kl_to_optimum_support`` = the same KL with both renormalized over the support, and
    the off-support mass. Elsewhere the off-support mass is estimated as the share of sampled completions that
    equal no chosen/rejected response of their prompt, over the held-out prompts that appear in the pairs (the
    metric is absent when none do, e.g. the built-in tasks' held-out prompts); on free text nearly every sample
    is new, so there it reads ≈ 1 and says little."""
    from lab.tasks.enumerable import exact_metrics, next_token_logprobs, support_mask

    was_training = policy.model.training
    policy.model.eval()
    try:
        out = {}
        if task is not None and task.kind == "bandit":
            eval_prompts = task.eval_prompts()
            logprobs = next_token_logprobs(policy.model, policy.tokenizer, eval_prompts)  # (B, V)
            rewards = task.reward_tables(eval_prompts, policy.tokenizer).to(logprobs)  # (B, V)
            ref_logprobs = None
            if use_reference:
                with policy.reference() as ref:
                    ref_logprobs = next_token_logprobs(ref, policy.tokenizer, eval_prompts)  # (B, V)
            mask = support_mask(eval_prompts, support, policy.tokenizer) if support is not None else None
            exact = exact_metrics(logprobs, rewards, ref_logprobs, getattr(cfg, "beta", None), mask)
            out["eval/sample_reward"] = exact.pop("exact_reward")
            if "kl_ref" in exact:
                out["kl/ref"] = exact.pop("kl_ref")
            out.update({f"eval/{k}": v for k, v in exact.items()})
        elif prompts or task is not None:
            prompts = prompts or task.eval_prompts()[: cfg.eval_size]
            from lab.rollout import resolve_max_new_tokens

            max_new = resolve_max_new_tokens(cfg, task)
            roll = sample_heldout(policy, prompts, max_new_tokens=max_new, samples=cfg.kl_samples, seed=cfg.seed)
            if task is not None:
                gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
                out["eval/sample_reward"] = sum(gold) / len(gold)
            if use_reference:
                out["kl/ref"] = sampled_kl(policy, roll)
            if support is not None:
                off = sampled_off_support(roll.prompts, roll.completions, support)
                if off is not None:
                    out["eval/mass_off_support"] = off
        if task is not None:
            from lab.evaluate import evaluate

            out["eval/gold_reward"] = evaluate(policy, task, n=cfg.eval_size, max_new_tokens=cfg.max_new_tokens)[
                "gold_reward"
            ]
        return out
    finally:
        policy.model.train(was_training)


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


def greedy_samples(policy, task, cfg, n: int = 4) -> list[dict]:
    from lab.evaluate import answer

    ans = answer(policy.model, policy.tokenizer, task, task.eval_prompts()[:n], max_new_tokens=cfg.max_new_tokens)
    return [
        {"prompt": p, "completion": c, "gold_reward": r} for p, c, r in zip(ans.prompts, ans.completions, ans.rewards)
    ]


def _is_eval_step(cfg, step: int) -> bool:
    return step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: DPOConfig, *, policy=None, stop: threading.Event | None = None, record=None) -> Iterator[dict]:
    """One optimizer step per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    from lab.tasks import TASKS, get_task
    from lab.tasks.enumerable import pair_support

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    rows = load_preference_rows(cfg, "train")
    policy = policy or _load_policy(cfg, task, [r["prompt"] for r in rows])
    uses_reference = USES_REFERENCE[cfg.loss_type]
    add_eos = ends_with_eos(task)
    params = policy.trainable_parameters()
    optimizer = make_optimizer(params, cfg)
    batches = shuffled_batches(rows, cfg.batch_size, cfg.seed)
    heldout_prompts = None if task is not None else unique_prompts(rows)[: cfg.eval_size]
    support = pair_support(rows)  # the responses the loss sees, for eval/mass_off_support
    micro = pair_microbatch(cfg, policy)

    with Run(cfg, "dpo", policy=policy, stop=stop, record=record) as run:
        run.summary["rows"] = len(rows)
        # π_θ = π_ref before the first step, so kl/ref is 0 there and not estimated
        run.summary["before"] = heldout_metrics(
            policy, task, cfg, use_reference=False, prompts=heldout_prompts, support=support
        )
        for step in run.steps():
            # 1. batch: B preference pairs from shuffled epochs of the data
            batch_rows = next(batches)
            batch = encode_preference_batch(policy.tokenizer, batch_rows, cfg.max_length, add_eos)
            B = len(batch_rows)
            metrics: dict = {}
            # kl/ref of the policy this step's loss sees, before its update (an evaluation step logs the held-out
            # one, after the update, instead); simpo has no π_ref
            if uses_reference and kl_due(step, cfg.kl_every) and not _is_eval_step(cfg, step):
                metrics["kl/ref"] = step_kl(policy, task, cfg, heldout_prompts, seed=cfg.seed + step)
            policy.model.train()
            totals = MetricAccumulator()
            for start in range(0, B, micro):  # microbatches of b pairs; the loss is a pair mean, so × b/B
                part = select_pairs(batch, start, min(start + micro, B)).to(policy.device)
                share = min(micro, B - start) / B

                # 2. policy log-probs of chosen and rejected, one forward pass over 2b sequences
                chosen, rejected, chosen_lengths, rejected_lengths = pair_logprobs(policy.model, part)  # 4 × (b,)
                pair = PairLogprobs(chosen, rejected, chosen_lengths, rejected_lengths)

                # 3. reference log-probs (never for simpo: it has no reference)
                if uses_reference:
                    with torch.no_grad(), policy.reference() as ref:
                        pair.ref_chosen, pair.ref_rejected, _, _ = pair_logprobs(ref, part)  # (b,), (b,)

                # 4. loss, accumulated
                loss, part_metrics = LOSSES[cfg.loss_type](pair, cfg)
                part_metrics["logprobs/chosen"] = chosen.detach().mean()
                part_metrics["logprobs/rejected"] = rejected.detach().mean()
                (loss * share).backward()
                totals.add(part_metrics, share)  # every metric is a mean over pairs

            # 5. update
            metrics.update(totals.sums())
            metrics["grad/norm"] = clip_and_step(optimizer, params, cfg.max_grad_norm)

            # 6. held-out evaluation
            if _is_eval_step(cfg, step):
                heldout = heldout_metrics(
                    policy, task, cfg, use_reference=uses_reference, prompts=heldout_prompts, support=support
                )
                metrics.update(heldout)
                run.summary["after"] = heldout
            if run.want_samples(step) and task is not None:
                run.samples(step, greedy_samples(policy, task, cfg))
            yield run.log(step, metrics, tokens=int(batch.attention_mask.sum()))


Config = DPOConfig
