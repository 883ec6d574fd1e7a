"""PPO-RLHF: maximize a learned reward, stay near the reference policy, keep the language-modelling skill.

Paper card
----------
InstructGPT (Ouyang et al. 2022, eq. 2), following Ziegler et al. 2019 and Stiennon et al. 2020::

    max_θ  E_{x~D, y~π_θ(·|x)} [ r_φ(x, y) − β · log(π_θ(y|x) / π_ref(y|x)) ]  +  λ · E_{(x,y)~D_ptx} [ log π_θ(y|x) ]

The first two terms are the KL-regularized reward; the third ("PPO-ptx") keeps predicting the next token on
pretraining / SFT text so the policy does not forget how to write. The first two are optimized with PPO
(Schulman et al. 2017) on a token-level MDP: the state is the prompt plus the tokens so far, the action is the
next token, and the reward is shaped per token (Stiennon et al. 2020)::

    r_t = −β · KL_t + [t = last token] · r_φ(x, y)          KL_t = log π_old(y_t|s_t) − log π_ref(y_t|s_t)  (k1)

Advantages come from a learned value function V(s_t) by GAE (Schulman et al. 2016); PPO then takes several
clipped steps on the same rollout batch::

    ratio_t = π_θ(y_t|s_t) / π_old(y_t|s_t)
    L_policy = − E_t[ min(ratio_t · A_t, clip(ratio_t, 1 − ε_low, 1 + ε_high) · A_t) ]
    L_value  = ½ E_t[ max((V_θ − R_t)², (clip(V_θ, V_old − ε_v, V_old + ε_v) − R_t)²) ]
    L_ptx    = − E_{(x,y)~D_ptx}[ (1/|y|) Σ_t log π_θ(y_t|x, y_<t) ]              (lab.sft.sft_loss)
    loss     = L_policy + vf_coef · L_value + λ · L_ptx

==========================  ==============================================
symbol                      code
==========================  ==============================================
π_θ(y_t|s_t)                ``logprobs`` (B, T)
π_old (the rollout policy)  ``old_logprobs`` (B, T)
π_ref                       ``ref_logprobs`` (B, T), ``policy.reference()``
r_φ(x, y)                   ``scores`` (B,), ``make_reward(cfg.reward)``
β                           ``cfg.beta`` (``AdaptiveKLController`` when ``cfg.adaptive_kl``)
r_t                         ``rewards`` (B, T), ``shaped_rewards``
V(s_t)                      ``values`` (B, T), ``lab.modeling.add_value_head``
γ, λ_GAE                    ``cfg.gamma``, ``cfg.lam``
A_t, R_t                    ``advantages``, ``returns`` (B, T), ``gae``
ε_low, ε_high               ``cfg.epsilon_low``, ``cfg.epsilon_high`` (∞ with ``cfg.clip`` off)
ε_v                         ``cfg.epsilon_value``
λ (ptx)                     ``cfg.ptx_coef``
==========================  ==============================================

Batch levels: one *rollout batch* of ``batch_size`` prompts per step → ``num_minibatches`` *minibatches* per PPO
epoch (one optimizer step each) → ``gradient_accumulation`` *microbatches* per minibatch (one forward/backward
each). Shapes: B batch, P prompt length, T completion length, V vocabulary.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lab import dist
from lab.config import BaseConfig, check, opt
from lab.onpolicy import RatioMeter, check_epsilons, clip_bounds
from lab.ops import KL_ESTIMATORS, kl_estimate, masked_mean, masked_var, masked_whiten
from lab.runner import (
    MetricAccumulator,
    Run,
    auto_microbatch,
    clip_and_step,
    load_for,
    make_optimizer,
    seed_everything,
    shuffled_batches,
)
from lab.sft import sft_loss

SAMPLE_ROWS = 4  # completions logged as samples, with their per-token numbers (lab.rollout.sample_rows)


@dataclass
class PPOConfig(BaseConfig):
    """PPO-RLHF: reward − β·KL(π_θ‖π_ref) + λ·LM loss, with a value function, GAE and clipped updates."""

    task: str = opt("reviews", "built-in task (reviews, arith, bandit) or a prompt source: jsonl:PATH, hf:ID")
    reward: str = opt(
        "gold",
        "r(x, y): 'gold' (the task's own reward), a reward-model run folder or checkpoint "
        "(lab train rm), or python:module:function",
    )
    lr: float | None = opt(
        None,
        "AdamW learning rate (policy adapter, value adapter and value head); default: 3e-4 "
        "on the built-in models, 2e-5 (LoRA/QLoRA) or 1e-6 (full) on your own",
        min=1e-7,
        max=1.0,
        builtin=3e-4,
    )
    steps: int = opt(30, "PPO iterations: one rollout batch and its PPO epochs each", min=1, max=1_000_000)
    batch_size: int = opt(32, "prompts per rollout batch (one completion each)", min=1, max=4096)
    # the KL-regularized reward
    beta: float = opt(0.05, "β: weight of the per-token KL(π_θ‖π_ref) penalty in the reward", min=0.0, max=10.0)
    # As a reward, only k1 keeps the optimum: the policy gradient of a fixed per-token reward −β·k is
    # −β·E[k ∇log π], and E_π[k3 ∇log π] = ∇KL(π‖π_ref) − E_π[∇k3] misses the second part; adding it back,
    # k3 + (1 − π_ref/π) = −log(π_ref/π), is k1. tests/test_ppo.py shows the k3 reward's fixed point on bandit.
    kl_estimator: str = opt(
        "k1",
        "per-token KL in the reward: k1 = log π/π_ref, whose fixed point is π* ∝ "
        "π_ref·e^{r/β} (InstructGPT); k2 and k3 are refused: as a reward their "
        "gradient is biased and their fixed point is not π*",
        choices=tuple(KL_ESTIMATORS),
    )
    adaptive_kl: bool = opt(False, "adapt β toward target_kl (Ziegler et al. 2019) instead of keeping it fixed")
    target_kl: float = opt(1.0, "adaptive β: the KL(π_θ‖π_ref) per completion to aim for, in nats", min=1e-3, max=100.0)
    horizon: int = opt(
        1000,
        "adaptive β: samples over which β moves; each step changes β by a factor within 1 ± 0.2 · batch_size / horizon",
        min=1,
        max=10_000_000,
    )
    missing_eos_penalty: float = opt(
        0.0, "subtracted from the score of completions that never emit EOS (0 disables)", min=0.0, max=100.0
    )
    # advantages
    gamma: float = opt(1.0, "γ: discount per token", min=0.0, max=1.0)
    lam: float = opt(
        0.95, "λ of GAE: 0 = one-step TD (low variance), 1 = Monte Carlo return (no bias)", min=0.0, max=1.0
    )
    # Whitening keeps the step size steady; when the returns barely vary (near an optimum) it also magnifies the
    # value function's errors to unit size, which tests/test_ppo.py's bandit test avoids by turning it off.
    whiten_advantages: bool = opt(True, "normalize advantages to mean 0, std 1 over the rollout batch")
    # the PPO update
    epsilon_low: float = opt(0.2, "ε_low: the ratio is clipped below at 1 − ε_low", min=0.0, max=0.999)
    epsilon_high: float = opt(0.2, "ε_high: the ratio is clipped above at 1 + ε_high", min=0.0, max=10.0)
    clip: bool = opt(
        True,
        "clip the ratio to [1 − ε_low, 1 + ε_high]; false: ε = ∞, plain importance sampling −ρ·A "
        "(the attempt ladder's attempt 2, lab.ladder)",
    )
    epsilon_value: float = opt(0.2, "ε_v: new values stay within ±ε_v of the rollout's values", min=1e-3, max=100.0)
    # The value function has its own adapter and head, and Adam rescales each parameter's gradient, so vf_coef acts
    # mainly through the joint gradient-norm clip (it matters fully only when policy and value share weights).
    vf_coef: float = opt(0.1, "weight of the value loss in the total loss", min=0.0, max=100.0)
    ppo_epochs: int = opt(4, "passes over each rollout batch", min=1, max=100)
    num_minibatches: int = opt(
        2, "minibatches per pass (one optimizer step each); must divide batch_size", min=1, max=4096
    )
    gradient_accumulation: int = opt(
        1,
        "microbatches per minibatch (forward/backward each, one optimizer step); must divide the minibatch size",
        min=1,
        max=4096,
    )
    # the ptx term
    ptx_coef: float = opt(
        0.0, "λ: weight of the LM loss on SFT/pretraining rows (0 disables PPO-ptx)", min=0.0, max=100.0
    )
    ptx_data: str | None = opt(
        None,
        "rows for the ptx term: jsonl:PATH, PATH.jsonl or hf:ID with prompt and "
        "completion; default: the built-in task's SFT rows",
    )
    ptx_batch_size: int = opt(8, "ptx rows per optimizer step", min=1, max=4096)
    max_length: int = opt(256, "ptx rows: truncate prompt+completion to this many tokens", min=2, max=65536)
    eval_every: int = opt(
        0, "evaluate on held-out prompts every N steps (0: only before and after)", min=0, max=1_000_000
    )

    def __post_init__(self) -> None:
        check(
            self.kl_estimator in KL_ESTIMATORS,
            "kl_estimator",
            f"must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}",
        )
        check(
            self.kl_estimator == "k1",
            "kl_estimator",
            f"{self.kl_estimator} as a per-token reward biases the policy gradient away from π* (its score-function "
            f"gradient lacks E[∇{self.kl_estimator}]; with it added k3 becomes k1): use k1",
        )
        check_epsilons(self)
        super().__post_init__()
        check(
            self.num_minibatches <= self.batch_size and self.batch_size % self.num_minibatches == 0,
            "num_minibatches",
            f"must divide batch_size ({self.batch_size}) so every minibatch has the same "
            f"size, got {self.num_minibatches}",
        )
        minibatch = self.batch_size // self.num_minibatches
        check(
            minibatch % self.gradient_accumulation == 0,
            "gradient_accumulation",
            f"must divide the minibatch size batch_size/num_minibatches = {minibatch}, "
            f"got {self.gradient_accumulation}",
        )
        check(
            not (self.adaptive_kl and self.beta == 0),
            "adaptive_kl",
            "needs beta > 0: the controller multiplies β, and 0 stays 0",
        )
        from lab.tasks import TASKS

        builtin = self.task in TASKS
        check(
            builtin or self.reward != "gold",
            "reward",
            f"'gold' needs a built-in task ({', '.join(TASKS)}); for {self.task!r} give a reward-model path "
            "or python:module:function",
        )
        check(
            builtin or self.ptx_coef == 0 or self.ptx_data is not None,
            "ptx_data",
            f"ptx_coef > 0 needs SFT rows: give --ptx-data jsonl:PATH for task {self.task!r}",
        )
        check(
            not (self.task == "bandit" and self.missing_eos_penalty > 0),
            "missing_eos_penalty",
            "must be 0 on bandit: its answers are one token and never end with EOS",
        )


# ----------------------------------------------------------------------------------------------------------------------
# Pure pieces: tensors in, tensors out


@torch.no_grad()
def shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token reward of the token-level MDP (Ziegler et al. 2019; Stiennon et al. 2020)::

        r_t = −β · KL_t + [t = last real token] · score         t = 0 .. T−1
        KL_t = log π(y_t) − log π_ref(y_t)             (k1)
        KL_t = (ρ_t − 1) − log ρ_t,  ρ_t = π_ref/π     (k3)

    so Σ_t r_t = score − β · KL(π‖π_ref) of the whole completion (exactly, for k1). r_t = 0 on padding.

    scores (B,), logprobs / ref_logprobs / completion_mask (B, T). Returns rewards (B, T).
    """
    keep = completion_mask.bool()  # (B, T)
    kl = kl_estimate(estimator, logprobs.float(), ref_logprobs.float())  # (B, T)
    rewards = torch.where(keep, -beta * kl, torch.zeros_like(kl))  # (B, T)
    last = keep.long().sum(-1).clamp(min=1) - 1  # (B,) index of the last real token (EOS when there is one)
    return rewards.scatter_add(1, last[:, None], scores.float()[:, None].to(rewards.device))  # (B, T)


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, completion_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), one reverse pass over the tokens::

        δ_t = r_t + γ · V_{t+1} − V_t             V_{t+1} = 0 after the last real token (the episode ends)
        A_t = δ_t + γλ · A_{t+1}                  i.e. A_t = Σ_{l≥0} (γλ)^l δ_{t+l}
        R_t = A_t + V_t                           the value target (a λ-return)

    Padding (mask 0, after EOS) gets r = V = 0, so it adds nothing. rewards, values, completion_mask: (B, T).
    Returns (advantages, returns), both (B, T) and 0 on padding.
    """
    keep = completion_mask.bool()  # (B, T)
    rewards = torch.where(keep, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))  # (B, T)
    values = torch.where(keep, values.float(), torch.zeros_like(values, dtype=torch.float32))  # (B, T)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # (B,) V_{t+1}
    next_advantage = rewards.new_zeros(B)  # (B,) A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = delta + gamma * lam * next_advantage  # (B,)
        advantages_reversed.append(next_advantage)
        next_value = values[:, t]
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7; ε_low = ε_high there), averaged over the real tokens::

        ratio_t = exp(log π_θ(y_t) − log π_old(y_t))
        L = − mean_t min(ratio_t · A_t, clip(ratio_t, 1 − ε_low, 1 + ε_high) · A_t)

    ε_low = ε_high = ∞ (``clip`` off) leaves L = − mean_t ratio_t · A_t: importance sampling without a trust region.

    The min makes the objective pessimistic: once the ratio has moved past 1 ± ε in the direction the advantage
    favours, the clipped branch is taken and its gradient is 0. At ratio 1 (the first minibatch) the gradient is
    the vanilla policy gradient − mean_t A_t ∇log π_θ(y_t).

    logprobs (grad), old_logprobs, advantages, completion_mask: (B, T). Returns (loss, metrics).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)  # (B, T)
    loss = masked_mean(torch.max(unclipped, clipped), completion_mask)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss.detach(),
            # the clipped branch is the larger loss: the token's gradient is 0
            "clip/frac": masked_mean((clipped > unclipped).float(), completion_mask),
            # ½ E[(log π_θ − log π_old)²]: how far this update has moved the policy from the rollout (Schulman 2020)
            "kl/approx": masked_mean(0.5 * log_ratio**2, completion_mask),
            "ratio/mean": masked_mean(ratio, completion_mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    completion_mask: torch.Tensor,
    epsilon_value: float,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (as in OpenAI's baselines ppo2 and Ziegler et al. 2019's lm-human-preferences)::

        V_clip = V_old + clip(V_θ − V_old, −ε_v, ε_v)
        L = ½ · mean_t max((V_θ − R_t)², (V_clip − R_t)²)

    values (grad), old_values, returns, completion_mask: (B, T). Returns (loss, metrics).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -epsilon_value, epsilon_value)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), completion_mask)
    with torch.no_grad():
        metrics = {
            "loss/value": loss.detach(),
            "clip/value_frac": masked_mean((clipped > unclipped).float(), completion_mask),
        }
    return loss, metrics


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the real tokens: 1 = V predicts the returns, 0 = no better than their mean."""
    return 1.0 - masked_var(returns - values, completion_mask) / masked_var(returns, completion_mask).clamp(min=1e-8)


class AdaptiveKLController:
    """β that tracks a KL target (Ziegler et al. 2019, §2.2)::

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + K_β · e_t),      K_β = n_samples / horizon

    KL above target raises β (a stronger pull back to π_ref); below target lowers it.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = float(beta), float(target), int(horizon)

    def update(self, kl: float, n_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_samples / self.horizon
        return self.beta


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def _ptx_rows(cfg, task) -> list[dict]:
    """Rows for the ptx term: ``cfg.ptx_data``, else the built-in task's SFT rows."""
    if cfg.ptx_coef == 0:
        return []
    if cfg.ptx_data is not None:
        from lab.data import load_rows

        return list(load_rows(cfg.ptx_data, format="prompt_completion", skip_bad_rows=cfg.skip_bad_rows))
    return task.sft_rows("train")


class PPOCheckpoint:
    """What a PPO checkpoint holds: the policy (its adapter, and the value adapter in the ``value/`` subfolder that
    peft gives a second adapter) plus the value head, ``value_head.pt``; in full mode the value model's own trunk
    goes to ``value/``."""

    def __init__(self, policy, value_model):
        self.policy, self.value_model = policy, value_model
        self.tokenizer = policy.tokenizer

    def save(self, path) -> None:
        from pathlib import Path

        path = Path(path)
        self.policy.save(path)
        if self.value_model.adapter_name is None:
            self.value_model.save(path / "value")
        torch.save(self.value_model.head.state_dict(), path / "value_head.pt")


@dataclass
class PPOSetup:
    """What PPO holds before its first step: the policy-gradient set-up plus a value model and a ptx stream."""

    task: Any
    reward_fn: Any
    batches: Iterator[list[dict]]  # rollout batches of prompt rows
    ptx_batches: Iterator[list[dict]] | None  # SFT rows for the ptx term, None when ptx_coef = 0
    policy: Any
    value_model: Any  # V(s_t): lab.modeling.add_value_head
    value_active: Any  # a context in which the value adapter is the active one (see ppo_setup)
    params: list  # policy and value parameters, one optimizer
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    max_new_tokens: int
    bandit_ref: torch.Tensor | None  # π_ref's next-token log-probs on bandit, for eval/kl_to_optimum


def ppo_setup(cfg: PPOConfig, policy=None, value_model=None) -> PPOSetup:
    """Seed, task, prompt rows and their batches, ptx rows, reward, policy, value model, one optimizer over both."""
    from lab.modeling import add_value_head
    from lab.rewards import make_reward
    from lab.rollout import bandit_reference, load_prompt_rows, resolve_max_new_tokens
    from lab.tasks import TASKS, get_task

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    rows = load_prompt_rows(cfg, task)  # {"prompt", **columns}: the columns go to the reward function
    ptx_rows = _ptx_rows(cfg, task)
    reward_fn = make_reward(cfg.reward, task)
    policy = policy or load_for(cfg, task, [r["prompt"] for r in rows])
    value_model = add_value_head(policy) if value_model is None else value_model
    value_model = dist.shard_model(value_model, cfg.mode)  # under FSDP sharded like the policy (lab.dist)
    # peft's set_adapter gives requires_grad to the active adapter only, and autograd silently drops the gradient of
    # a parameter whose requires_grad is off at backward time. So the value forward AND its backward run inside
    # `value_active()`, and the policy's outside it (tests/test_ppo.py checks that both adapters move).
    value_active = (
        (lambda: policy.adapter(value_model.adapter_name)) if value_model.adapter_name else contextlib.nullcontext
    )
    policy_params = policy.trainable_parameters()
    with value_active():
        value_params = value_model.trainable_parameters()
    params = policy_params + value_params
    # Dropout stays off throughout: the ratio must be exactly 1 on the first minibatch.
    policy.model.eval()
    value_model.eval()
    return PPOSetup(
        task=task,
        reward_fn=reward_fn,
        batches=shuffled_batches(rows, cfg.batch_size, cfg.seed),
        ptx_batches=shuffled_batches(ptx_rows, cfg.ptx_batch_size, cfg.seed + 1) if ptx_rows else None,
        policy=policy,
        value_model=value_model,
        value_active=value_active,
        params=params,
        optimizer=make_optimizer(params, cfg, only_trainable=False),
        generator=torch.Generator(device=policy.device).manual_seed(cfg.seed + dist.rank()),  # one stream a process
        max_new_tokens=resolve_max_new_tokens(cfg, task),
        bandit_ref=bandit_reference(policy, task),  # π_ref over the vocabulary, for eval/kl_to_optimum on bandit
    )


def train(
    cfg: PPOConfig, *, policy=None, stop: threading.Event | None = None, record=None, value_model=None
) -> Iterator[dict]:
    """One PPO iteration (rollout + PPO epochs) per ``next()``; see :mod:`lab.runner` for the record and stop rules.

    ``value_model``: the value function to train, ``lab.modeling.add_value_head(policy)`` when None."""
    from lab.data import prompt_columns
    from lab.evaluate import heldout_metrics
    from lab.rollout import rollout, rollout_tokens, sample_rows, score

    s = ppo_setup(cfg, policy, value_model)
    policy, task = s.policy, s.task
    kl_controller = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.horizon) if cfg.adaptive_kl else None
    beta = cfg.beta

    def evaluate() -> dict:
        """eval/gold_reward (greedy, held-out prompts); on bandit also eval/exact_reward and eval/kl_to_optimum."""
        return heldout_metrics(policy, task, cfg.eval_size, beta=cfg.beta or None, ref_logprobs=s.bandit_ref)

    def unprefixed(metrics: dict) -> dict:
        return {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}

    save, state = PPOCheckpoint(policy, s.value_model), (s.generator, s.batches, s.ptx_batches, kl_controller)
    with Run(cfg, "ppo", policy=policy, stop=stop, record=record, save=save, optimizer=s.optimizer, state=state) as run:
        run.summary["before"] = unprefixed(evaluate())
        for step in run.steps():
            beta = kl_controller.beta if kl_controller is not None else beta  # a resumed run's β is the controller's
            # 1. rollout: one completion per prompt from the current policy π_old
            batch_rows = dist.shard(next(s.batches))  # this process's prompts (all of them on one)
            roll = rollout(policy, [r["prompt"] for r in batch_rows], cfg, s.generator, s.max_new_tokens)
            # 2. score: r_φ(x, y), minus the missing-EOS penalty
            raw_scores = score(s.reward_fn, roll, prompt_columns(batch_rows))  # (B,)
            scores = raw_scores - cfg.missing_eos_penalty * roll.truncated.float()  # (B,)
            # 3. advantages: π_old, π_ref, the shaped per-token rewards, V_old and GAE
            batch = ppo_advantages(cfg, s, roll, scores, beta)
            # 4. update: PPO epochs over minibatches (one optimizer step each), microbatches within
            out = {**ppo_update(cfg, s, roll, batch), **ppo_rollout_metrics(cfg, task, roll, raw_scores, batch, beta)}
            # 5. adaptive β, from this rollout's KL(π_old‖π_ref) per completion
            if kl_controller is not None:
                beta = kl_controller.update(dist.mean(out["kl/ref"]), cfg.batch_size)  # the same β on every process
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                out.update(evaluate())
            if run.want_samples(step):
                per_token = {"values": batch.old_values, "returns": batch.returns}
                rows = sample_rows(
                    roll,
                    raw_scores,
                    batch.advantages,
                    SAMPLE_ROWS,
                    policy=policy,
                    temperature=cfg.temperature,
                    logprobs=batch.old_logprobs,
                    ref_logprobs=batch.ref_logprobs,
                    per_token=per_token,
                )
                run.samples(step, rows)
            yield run.log(step, out, tokens=rollout_tokens(roll))
            if step == cfg.steps:
                run.summary["after"] = unprefixed(out)
        if "after" not in run.summary:  # stopped early: evaluate what there is
            run.summary["after"] = unprefixed(evaluate())


@dataclass
class PPOBatch:
    """A scored rollout ready for the PPO epochs: every tensor (B, T) and fixed during the update."""

    old_logprobs: torch.Tensor  # log π_old, the policy that sampled
    ref_logprobs: torch.Tensor  # log π_ref
    entropy: torch.Tensor  # entropy of π_old at each position
    rewards: torch.Tensor  # shaped per-token rewards r_t
    old_values: torch.Tensor  # V_old(s_t)
    advantages: torch.Tensor  # A_t (whitened when cfg.whiten_advantages)
    returns: torch.Tensor  # R_t, the value target
    mask: torch.Tensor  # completion_mask as float
    chunk: int  # rows per no-grad forward pass


@torch.no_grad()
def ppo_advantages(cfg: PPOConfig, s: PPOSetup, roll, scores: torch.Tensor, beta: float) -> PPOBatch:
    """3. The no-grad passes over the whole rollout (π_old with its entropy, π_ref, V_old), in chunks that fit in
    memory, then the shaped rewards and GAE. V(s_t) is read where token t is predicted: the state x, y_<t."""
    from lab.rollout import completion_logprobs, logprobs_in_chunks

    mask = roll.completion_mask.float()  # (B, T)
    P, T = roll.prompt_ids.shape[1], roll.completion_ids.shape[1]
    chunk = auto_microbatch(s.policy.model, cfg.batch_size, T, context_tokens=P)
    parts = [roll.select(slice(i, i + chunk)) for i in range(0, len(roll), chunk)]
    pieces = [completion_logprobs(s.policy.model, part, cfg.temperature, with_entropy=True) for part in parts]
    old_logprobs = torch.cat([lp for lp, _ in pieces])  # (B, T)
    entropy = torch.cat([h for _, h in pieces])  # (B, T)
    with s.policy.reference() as ref:
        ref_logprobs = logprobs_in_chunks(ref, roll, cfg.temperature, chunk)  # (B, T)
    rewards = shaped_rewards(scores, old_logprobs, ref_logprobs, mask, beta, cfg.kl_estimator)  # (B, T)
    with s.value_active():
        old_values = torch.cat(
            [s.value_model(part.input_ids, part.attention_mask)[:, P - 1 : P + T - 1] for part in parts]
        )  # (B, T)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (B, T), (B, T)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)  # (B, T)
    return PPOBatch(old_logprobs, ref_logprobs, entropy, rewards, old_values, advantages, returns, mask, chunk)


def ppo_update(cfg: PPOConfig, s: PPOSetup, roll, batch: PPOBatch) -> dict:
    """4. ``ppo_epochs`` passes; each pass: shuffled minibatches (one optimizer step each, with the ptx term), of
    microbatches (one forward/backward each). Returns the token means averaged over the optimizer steps, and the
    ratio's spread over every update (``kl/old``, ``ratio/*``: ``lab.onpolicy.RatioMeter``)."""
    minibatch_size = dist.per_process(cfg.batch_size // cfg.num_minibatches, "batch_size / num_minibatches")
    P, T = roll.prompt_ids.shape[1], roll.completion_ids.shape[1]
    # microbatches no larger than gradient_accumulation asks nor than memory allows
    micro_size = min(
        minibatch_size // cfg.gradient_accumulation,
        auto_microbatch(s.policy.model, minibatch_size, T, context_tokens=P),
    )
    update_metrics, ratios = [], RatioMeter()
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(roll))  # (B,) on the CPU: it indexes the rollout's tensors and lists
        for start in range(0, len(roll), minibatch_size):
            minibatch = order[start : start + minibatch_size]  # (B / num_minibatches,)
            metrics = ppo_minibatch(cfg, s, roll, batch, minibatch, micro_size, ratios)
            if s.ptx_batches is not None:  # λ · LM loss on SFT/pretraining rows, in the same optimizer step
                metrics["loss/ptx"] = ptx_step(cfg, s)
            metrics["grad/norm"] = clip_and_step(s.optimizer, s.params, cfg.max_grad_norm)
            update_metrics.append(metrics)
    out = {k: sum(m[k] for m in update_metrics) / len(update_metrics) for k in update_metrics[0]}
    return {**out, **ratios.metrics()}


def ppo_minibatch(cfg: PPOConfig, s: PPOSetup, roll, batch: PPOBatch, minibatch, micro_size: int, ratios) -> dict:
    """The gradients of one minibatch, accumulated over its microbatches; returns its token-mean metrics."""
    from lab.rollout import completion_logprobs

    P, T = roll.prompt_ids.shape[1], roll.completion_ids.shape[1]
    epsilon_low, epsilon_high = clip_bounds(cfg)
    tokens = dist.global_sum(batch.mask[minibatch].sum()).clamp(min=1)  # every process's minibatch
    totals = MetricAccumulator()  # token means of the minibatch, summed on the device
    for micro_start in range(0, len(minibatch), micro_size):
        idx = minibatch[micro_start : micro_start + micro_size]  # (b,)
        micro, m = roll.select(idx), batch.mask[idx]  # b rows, (b, T)
        # a microbatch's token mean × its share of the minibatch's tokens = the minibatch token mean
        share = m.sum() / tokens
        logprobs = completion_logprobs(s.policy.model, micro, cfg.temperature)  # (b, T)
        old = batch.old_logprobs[idx]  # (b, T)
        policy_loss, policy_metrics = ppo_policy_loss(
            logprobs, old, batch.advantages[idx], m, epsilon_low, epsilon_high
        )
        (policy_loss * share).backward()  # the policy adapter is active here
        ratios.add(logprobs, old, m)
        with s.value_active():
            values = s.value_model(micro.input_ids, micro.attention_mask)[:, P - 1 : P + T - 1]  # (b, T)
            value_loss, value_metrics = ppo_value_loss(
                values, batch.old_values[idx], batch.returns[idx], m, cfg.epsilon_value
            )
            (cfg.vf_coef * value_loss * share).backward()  # the value adapter is active here
        totals.add({**policy_metrics, **value_metrics}, share)
    return totals.sums()


def ptx_step(cfg: PPOConfig, s: PPOSetup) -> float:
    """The ptx term's gradient, λ · ∇L_ptx on one batch of SFT rows (lab.sft.sft_loss); returns L_ptx."""
    from lab.batching import encode_pairs, token_logprobs

    rows = next(s.ptx_batches)
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    batch = encode_pairs(s.policy.tokenizer, prompts, completions, max_length=cfg.max_length).to(s.policy.device)
    ptx_logprobs, ptx_mask = token_logprobs(s.policy.model, batch)  # (b, L-1), (b, L-1)
    ptx, ptx_metrics = sft_loss(ptx_logprobs, ptx_mask)
    (cfg.ptx_coef * ptx / dist.world_size()).backward()  # the same rows on every process
    return float(ptx_metrics["loss/sft"])


@torch.no_grad()
def ppo_rollout_metrics(cfg: PPOConfig, task, roll, raw_scores: torch.Tensor, batch: PPOBatch, beta: float) -> dict:
    """The rollout's side of a step's metrics: reward, KL to π_ref, entropy, value fit, lengths, diversity."""
    from lab.diagnostics import diversity_metrics

    mask = batch.mask
    kl_seq = (kl_estimate(cfg.kl_estimator, batch.old_logprobs, batch.ref_logprobs) * mask).sum(-1)  # (B,)
    out = {
        "reward/mean": raw_scores.mean(),
        "reward/shaped": batch.rewards.sum(-1).mean(),
        "kl/ref": kl_seq.mean(),
        "entropy": dist.masked_mean(batch.entropy, mask),
        "value/explained_var": explained_variance(batch.old_values, batch.returns, mask),
        "completion/length": mask.sum(-1).mean(),
        "completion/truncated_frac": roll.truncated.float().mean(),
        "beta": beta,
    }
    if task is not None:
        gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
        out["reward/gold"] = sum(gold) / len(gold)
    out.update(diversity_metrics(roll))  # diversity/*: lab.diagnostics
    return out
