"""Conditional SFT on preference pairs: learn both answers, each behind a control string, then ask for the good one.

Paper card
----------
The seed's first alternative to RL: "SFT on pairwise preferences: prepend good on preferred, bad on rejected.
Then train conditioning on good." Each pair (x, y_w, y_l) becomes two demonstrations whose context ends with a
control string c, and the loss is plain SFT on the answer tokens (``lab.sft.sft_loss``) over both::

    L(θ) = − E_{(x, y_w, y_l)} [ (1/|y_w|) Σ_t log π_θ(y_w,t | x, c_good, y_w,<t)
                               + (1/|y_l|) Σ_t log π_θ(y_l,t | x, c_bad,  y_l,<t) ] / 2     (token mean over both)

    deployed policy:   y ~ π_θ(· | x, c_good)

The control is the first thing after the prompt, in the context and never a target (its own probability says
nothing about quality). The idea is CTRL's control codes (Keskar et al. 2019); with rewards turned into such
tokens it is Quark (Lu et al. 2022) and "decision-transformer"-style reward conditioning; Chain of Hindsight (Liu
et al. 2023) does it with natural-language feedback. Unlike SFT on the preferred answers, the rejected answer is
used: the model learns what separates the two, and the good context carries it. Unlike DPO, nothing pushes
π_θ(y_l | x, c_good) down: the bad answers are only ever seen behind c_bad.

It reports the metric names of SFT and of SFT on preferred (``loss/sft``, ``logprobs/chosen``, ``eval/*``,
``kl/ref``), measured on the deployed policy: held-out answers are generated after x + c_good, and ``kl/ref`` is
KL(π_θ(·|x, c_good) ‖ π_ref(·|x)), the distance from the reference as it answers without a control.

==========================  ==============================================
symbol                      code
==========================  ==============================================
c_good, c_bad               ``cfg.good``, ``cfg.bad`` (strings; ``control_prompt`` appends them)
x + c                       ``control_prompt(tokenizer, prompt, control)``
π_θ(y_t | x, c, y_<t)       ``logprobs`` (2B, L-1): chosen rows 0..B-1, rejected rows B..2B-1
L                           ``lab.sft.sft_loss`` over the 2B rows
==========================  ==============================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lab import dist
from lab.batching import PairBatch, _text, completion_end_token_id, token_logprobs
from lab.config import MicrobatchConfig, PreferenceDataConfig, check, opt
from lab.data import unique_prompts
from lab.errors import ConfigError
from lab.ops import masked_sum
from lab.runner import (
    Run,
    auto_microbatch,
    clip_and_step,
    load_for,
    make_optimizer,
    seed_everything,
    shuffled_batches,
)
from lab.sampling import Rollout, encode_prompt, format_prompt
from lab.sft import SFTAccumulator


@dataclass
class CSFTConfig(PreferenceDataConfig, MicrobatchConfig):
    """Conditional SFT: SFT on chosen answers behind a good control string and on rejected ones behind a bad one."""

    # 1e-3 as SFT, not SFT on preferred's 3e-4: the control word after the prompt is new context to learn, and at
    # 3e-4 the greedy reviews after 60 steps still repeated themselves (held-out gold −6.3; 1e-3: +2.1)
    lr: float | None = opt(
        None,
        "AdamW learning rate; default: 1e-3 on the built-in models, 2e-5 (LoRA/QLoRA) or 1e-6 (full) on your own",
        min=1e-7,
        max=1.0,
        builtin=1e-3,
    )
    steps: int = opt(60, "optimizer steps", min=1, max=1_000_000)
    batch_size: int = opt(32, "preference pairs per step (2 × batch_size demonstrations)", min=1, max=4096)
    per_sequence: bool = opt(False, "average the loss per sequence first instead of over all answer tokens")
    good: str = opt("good", "control string put after the prompt of every chosen answer, and used to generate")
    bad: str = opt("bad", "control string put after the prompt of every rejected answer")
    beta: float = opt(
        0.1, "β of π* for eval/kl_to_optimum on enumerable tasks (reported, not optimized)", min=1e-3, max=100.0
    )
    eval_every: int = opt(
        0, "held-out metrics of the deployed policy every N steps (0: at the end only)", min=0, max=1_000_000
    )
    kl_samples: int = opt(
        8, "completions sampled per held-out prompt for kl/ref and eval/sample_reward", min=1, max=1024
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.task != "bandit", "task", "bandit's 37-word vocabulary has no words to be controls; use reviews or "
              "your own pairs (jsonl:PATH, hf:ID)")  # fmt: skip
        for name in ("good", "bad"):
            value = getattr(self, name)
            check(
                isinstance(value, str) and value.strip() == value and value != "",
                name,
                f"must be a non-empty string without surrounding spaces, got {value!r}",
            )
        check(self.good != self.bad, "bad", f"must differ from good ({self.good!r}), or the control says nothing")


# ----------------------------------------------------------------------------------------------------------------------
# The control string and the batch


def check_controls(tokenizer, good: str, bad: str) -> None:
    """The two controls must reach the model as different tokens, none of them unknown: a word the tokenizer does
    not know becomes its unk token, and two such words would be the same control (one line, naming the field)."""
    unk = tokenizer.unk_token_id
    ids = {}
    for name, control in (("good", good), ("bad", bad)):
        ids[name] = tokenizer(" " + control, add_special_tokens=False)["input_ids"]
        if unk is not None and unk in ids[name]:
            raise ConfigError(f"{name}: {control!r} holds a word this tokenizer does not know (it reads as "
                              f"{tokenizer.unk_token!r}); pick a control made of words in its vocabulary")  # fmt: skip
    if ids["good"] == ids["bad"]:
        raise ConfigError(f"bad: {bad!r} and good {good!r} encode to the same tokens {ids['bad']}; pick different ones")


def control_prompt(tokenizer, prompt, control: str) -> str:
    """The prompt's text as the model reads it (``format_prompt``: a chat prompt goes through the template and ends
    with the assistant's header), then ``control``, after a space unless the text ends in whitespace. Training and
    generation both encode this one string, so the control's tokens are the same in both."""
    text = format_prompt(tokenizer, prompt)
    return text + control if text == "" or text[-1].isspace() else f"{text} {control}"


def encode_controlled_pairs(
    tokenizer, rows: list[dict], good: str, bad: str, max_length: int, add_eos: bool = True
) -> PairBatch:
    """Chosen answers behind ``good`` in rows 0..B-1, rejected answers behind ``bad`` in rows B..2B-1, right-padded.

    Each row is ``encode_prompt(control_prompt(x, c)) + answer (+ end token)``; ``completion_mask`` covers the answer
    (and its end token) only, so the control is context, never a target. As ``lab.batching.encode_pairs``: a
    conversational prompt's answer ends with the template's turn end, an answer the data marks as truncated
    (``chosen_truncated``) without one, and an over-long row loses prompt tokens from the left (the control stays)."""
    ids, masks = [], []
    for side, control in (("chosen", good), ("rejected", bad)):
        for row in rows:
            p = encode_prompt(tokenizer, control_prompt(tokenizer, row["prompt"], control))
            c = tokenizer(_text(row[side]), add_special_tokens=False)["input_ids"]
            if add_eos and not row.get(f"{side}_truncated", False):
                c = c + [completion_end_token_id(tokenizer, row["prompt"])]
            if len(p) + len(c) > max_length:
                keep = max(max_length - len(c), 1)
                p, c = p[-keep:], c[: max_length - keep]
            ids.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    L = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(ids), L), pad, dtype=torch.long)  # (2B, L)
    attention_mask = torch.zeros((len(ids), L), dtype=torch.long)  # (2B, L)
    completion_mask = torch.zeros((len(ids), L), dtype=torch.long)  # (2B, L)
    for i, (r, m) in enumerate(zip(ids, masks)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        completion_mask[i, : len(r)] = torch.tensor(m)
    return PairBatch(input_ids, attention_mask, completion_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation of the deployed policy π_θ(· | x, c_good)


class ControlledTask:
    """A task whose prompts end with the control string, for the shared evaluator: it generates after x + c and
    scores with the task's own gold reward of the original prompt x. Everything else is the task's."""

    def __init__(self, task, tokenizer, control: str):
        self.task, self.tokenizer, self.control = task, tokenizer, control
        self._original: dict[str, object] = {}

    def _controlled(self, prompts: list) -> list[str]:
        out = []
        for prompt in prompts:
            text = control_prompt(self.tokenizer, prompt, self.control)
            self._original[text] = prompt
            out.append(text)
        return out

    def eval_prompts(self) -> list[str]:
        return self._controlled(self.task.eval_prompts())

    def train_prompts(self) -> list[str]:
        return self._controlled(self.task.train_prompts())

    def gold_rewards(self, prompts: list, completions: list[str], truncated=None) -> list[float]:
        return self.task.gold_rewards([self._original.get(p, p) for p in prompts], completions, truncated)

    def reward_tables(self, prompts: list, tokenizer) -> torch.Tensor:
        return self.task.reward_tables([self._original.get(p, p) for p in prompts], tokenizer)

    def __getattr__(self, name):
        return getattr(self.task, name)


@torch.no_grad()
def control_kl(policy, roll: Rollout, prompts: list) -> float:
    """KL(π_θ(·|x, c) ‖ π_ref(·|x)) per completion, k1 over completions y ~ π_θ(·|x, c) (a rollout whose prompts
    end with the control): mean over y of Σ_t [log π_θ(y_t | x, c, y_<t) − log π_ref(y_t | x, y_<t)]. ``prompts``:
    the rollout's prompts x without the control. Naive equivalent: ``lab.evaluate.sampled_kl`` with π_ref reading
    the plain prompts."""
    from lab.rollout import logprobs_in_chunks

    tokenizer = policy.tokenizer
    plain = [encode_prompt(tokenizer, format_prompt(tokenizer, p)) for p in prompts]
    P = max(len(ids) for ids in plain)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(ids)) + ids for ids in plain])  # (B, P) left-padded
    prompt_mask = torch.tensor([[0] * (P - len(ids)) + [1] * len(ids) for ids in plain])  # (B, P)
    device = roll.completion_ids.device
    plain_roll = Rollout(
        list(prompts),
        roll.completions,
        prompt_ids.to(device),
        prompt_mask.to(device),
        roll.completion_ids,
        roll.completion_mask,
        roll.truncated,
    )
    rows = auto_microbatch(
        policy.model, len(roll), roll.completion_ids.shape[1], context_tokens=roll.prompt_ids.shape[1]
    )
    logprobs = logprobs_in_chunks(policy.model, roll, 1.0, rows)  # (B, T) log π_θ(y_t | x, c, y_<t)
    with policy.reference() as ref:
        ref_logprobs = logprobs_in_chunks(ref, plain_roll, 1.0, rows)  # (B, T) log π_ref(y_t | x, y_<t)
    return masked_sum(logprobs - ref_logprobs, roll.completion_mask.to(logprobs.dtype), dim=-1).mean().item()


@torch.no_grad()
def heldout(policy, task, cfg: CSFTConfig, prompts: list | None = None) -> dict:
    """The held-out metrics of SFT on preferred, for the deployed policy π_θ(·|x, c_good): ``eval/gold_reward``
    (greedy), ``eval/sample_reward`` and ``diversity/*`` (``cfg.kl_samples`` samples a prompt), ``kl/ref`` =
    KL(π_θ(·|x, c_good) ‖ π_ref(·|x)); on an enumerable task exact, with ``eval/kl_to_optimum``. ``prompts``:
    held-out prompts of your own data (no task)."""
    from lab.evaluate import heldout_metrics, sample_heldout
    from lab.rollout import resolve_max_new_tokens

    was_training = policy.model.training
    policy.model.eval()
    try:
        max_new = resolve_max_new_tokens(cfg, task)
        controlled_task = ControlledTask(task, policy.tokenizer, cfg.good) if task is not None else None
        plain = prompts if prompts is not None else task.eval_prompts()[: cfg.eval_size]
        controlled = [control_prompt(policy.tokenizer, p, cfg.good) for p in plain]
        out = heldout_metrics(
            policy,
            controlled_task,
            cfg.eval_size,
            kl_ref=False,
            samples=cfg.kl_samples,
            prompts=None if task is not None else controlled,
            max_new_tokens=max_new,
            seed=cfg.seed,
        )
        if task is not None and task.kind == "bandit":
            out.update(_exact_bandit(policy, task, cfg))
        else:  # the same samples heldout_metrics drew (same prompts, seed and count)
            roll = sample_heldout(policy, controlled, max_new_tokens=max_new, samples=cfg.kl_samples, seed=cfg.seed)
            out["kl/ref"] = control_kl(policy, roll, [p for p in plain for _ in range(cfg.kl_samples)])
        return out
    finally:
        policy.model.train(was_training)


def _exact_bandit(policy, task, cfg: CSFTConfig) -> dict:
    """Exact ``kl/ref`` = KL(π_θ(·|x, c_good) ‖ π_ref(·|x)) and ``eval/kl_to_optimum`` = KL(π* ‖ π_θ(·|x, c_good)),
    π* = π_ref(·|x)·exp(r/β)/Z, over the vocabulary of a one-token task."""
    from lab.tasks.enumerable import exact_metrics, next_token_logprobs

    prompts = task.eval_prompts()
    controlled = [control_prompt(policy.tokenizer, p, cfg.good) for p in prompts]
    logprobs = next_token_logprobs(policy.model, policy.tokenizer, controlled)  # (B, V)
    with policy.reference() as ref:
        ref_logprobs = next_token_logprobs(ref, policy.tokenizer, prompts)  # (B, V)
    rewards = task.reward_tables(prompts, policy.tokenizer).to(logprobs)  # (B, V)
    exact = exact_metrics(logprobs, rewards, ref_logprobs, cfg.beta)
    return {"kl/ref": exact["kl_ref"], "eval/kl_to_optimum": exact["kl_to_optimum"]}


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: CSFTConfig, *, policy=None, stop: threading.Event | None = None, record=None) -> Iterator[dict]:
    """One optimizer step per ``next()``; see :mod:`lab.runner` for the record and stop rules."""
    from lab.data import load_rows
    from lab.evaluate import greedy_samples
    from lab.tasks import TASKS, get_task

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    rows = list(load_rows(cfg.task, format="preference", skip_bad_rows=cfg.skip_bad_rows))
    policy = policy or load_for(cfg, task, [r["prompt"] for r in rows])
    check_controls(policy.tokenizer, cfg.good, cfg.bad)
    add_eos = task is None or task.kind != "bandit"  # a bandit answer is one token and the episode ends without eos
    params = policy.trainable_parameters()
    optimizer = make_optimizer(params, cfg)
    batches = shuffled_batches(rows, cfg.batch_size, cfg.seed)
    heldout_prompts = None if task is not None else unique_prompts(rows)[: cfg.eval_size]
    micro = cfg.microbatch_size or auto_microbatch(policy.model, cfg.batch_size, 2 * cfg.max_length)

    with Run(cfg, "csft", policy=policy, stop=stop, record=record, optimizer=optimizer, state=(batches,)) as run:
        run.summary["rows"] = len(rows)
        run.summary["before"] = heldout(policy, task, cfg, heldout_prompts)
        for step in run.steps():
            # 1. batch: B pairs → 2B demonstrations, chosen behind c_good (rows 0..B-1), rejected behind c_bad
            batch_rows = dist.shard(next(batches))  # this process's pairs (all of them on one, lab.dist)
            batch = encode_controlled_pairs(policy.tokenizer, batch_rows, cfg.good, cfg.bad, cfg.max_length, add_eos)
            B = len(batch_rows)

            # 2. loss: SFT on the answer tokens of all 2B rows, over microbatches of b pairs (2b rows)
            policy.model.train()
            tokens = dist.global_sum(batch.completion_mask[:, 1:].sum()).clamp(min=1)  # of every process's rows
            accumulator = SFTAccumulator(tokens, 2 * cfg.batch_size, cfg.per_sequence)
            sequence = []  # (2, b) log π_θ(y | x, c): the chosen row over the rejected row
            for start in range(0, B, micro):
                index = torch.cat(
                    [torch.arange(start, min(start + micro, B)), torch.arange(B + start, B + min(start + micro, B))]
                )
                part = batch.select(index).to(policy.device)
                logprobs, mask = token_logprobs(policy.model, part)  # (2b, L-1), (2b, L-1)
                accumulator.backward(logprobs, mask)
                sequence.append((logprobs.detach() * mask).sum(-1).view(2, -1))  # (2, b)
            metrics = accumulator.result()
            with torch.no_grad():
                sequence = torch.cat(sequence, 1)  # (2, B)
                metrics["logprobs/chosen"] = sequence[0].mean()
                metrics["logprobs/rejected"] = sequence[1].mean()

            # 3. update
            metrics["grad/norm"] = clip_and_step(optimizer, params, cfg.max_grad_norm)

            # 4. held-out evaluation of the deployed policy, conditioned on c_good
            if step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                metrics.update(heldout(policy, task, cfg, heldout_prompts))
                run.summary["after"] = {
                    k: v for k, v in metrics.items() if k.startswith(("eval/", "kl/", "diversity/"))
                }
            if run.want_samples(step) and task is not None:
                controlled = ControlledTask(task, policy.tokenizer, cfg.good)
                run.samples(step, greedy_samples(policy, controlled, cfg.max_new_tokens))
            yield run.log(step, metrics, tokens=int(batch.attention_mask.sum()))
