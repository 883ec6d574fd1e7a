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

from lab.batching import pair_logprobs, select_pairs
from lab.config import PreferencePolicyConfig, check, opt
from lab.evaluate import greedy_samples, step_kl
from lab.preference import is_eval_step, setup
from lab.rollout import kl_due
from lab.runner import MetricAccumulator, Run, clip_and_step, load_for, use_one_thread_for_tiny_models

LOSS_TYPES = ("sigmoid", "length_normalized", "simpo", "ipo")
# β means different things per loss (a KL weight on summed or per-token log-ratios, a reward scale for SimPO),
# so its default follows the loss: 0.1 for DPO (Rafailov et al.), 5 for length-normalized DPO (Tulu 3), 2 for SimPO
# (Meng et al. use 2–10), and 0.5 for IPO, whose per-token log-ratio margin is pulled to 1/(2β) = 1 nat.
DEFAULT_BETA = {"sigmoid": 0.1, "length_normalized": 5.0, "simpo": 2.0, "ipo": 0.5}


@dataclass
class DPOConfig(PreferencePolicyConfig):
    """Direct preference optimization (DPO, length-normalized DPO, SimPO, IPO) on preference pairs."""

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
    steps: int = opt(60, "optimizer steps", min=1, max=1_000_000)

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
# the policy


def _load_policy(cfg: DPOConfig, task, prompts: list | None = None):
    """The policy to train. SimPO in full mode gets no frozen reference copy: it never uses one."""
    if cfg.mode != "full" or USES_REFERENCE[cfg.loss_type]:
        return load_for(cfg, task, prompts)
    from lab.modeling import (
        Policy,
        check_prompts_fit_tokenizer,
        enable_gradient_checkpointing,
        load_causal_lm,
        load_tokenizer,
    )

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
# the loop


def train(cfg: DPOConfig, *, policy=None, stop: threading.Event | None = None, record=None) -> Iterator[dict]:
    """One optimizer step per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    s = setup(cfg, policy, load=_load_policy)  # task, pairs, policy, optimizer, batches, ... (lab.preference)
    task, policy, micro = s.task, s.policy, s.micro
    uses_reference = USES_REFERENCE[cfg.loss_type]

    with Run(cfg, "dpo", policy=policy, stop=stop, record=record, optimizer=s.optimizer, state=(s.batches,)) as run:
        s.start(run, cfg)  # π_θ = π_ref before the first step, so kl/ref is 0 there and not estimated
        for step in run.steps():
            # 1. batch: B preference pairs from shuffled epochs of the data
            B, batch = s.next_batch(cfg)
            metrics: dict = {}
            # kl/ref of the policy this step's loss sees, before its update (an evaluation step logs the held-out
            # one, after the update, instead); simpo has no π_ref
            if uses_reference and kl_due(step, cfg.kl_every) and not is_eval_step(cfg, step):
                metrics["kl/ref"] = step_kl(policy, task, cfg, s.heldout_prompts, seed=cfg.seed + step)
            policy.model.train()
            totals = MetricAccumulator()
            for start in range(0, B, micro):  # microbatches of b pairs; the loss is a pair mean, so × b/B
                part = select_pairs(batch, start, min(start + micro, B)).to(policy.device)
                share = min(micro, B - start) / cfg.batch_size  # of the global batch: B × processes pairs

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
            metrics["grad/norm"] = clip_and_step(s.optimizer, s.params, cfg.max_grad_norm)

            # 6. held-out evaluation
            if is_eval_step(cfg, step):
                heldout = s.heldout(cfg, use_reference=uses_reference)
                metrics.update(heldout)
                run.summary["after"] = heldout
            if run.want_samples(step) and task is not None:
                run.samples(step, greedy_samples(policy, task, cfg.max_new_tokens))
            yield run.log(step, metrics, tokens=int(batch.attention_mask.sum()))
