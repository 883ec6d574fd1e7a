"""Reward model: a scalar r_φ(x, y) fitted to preference pairs with the Bradley–Terry model.

Paper card
----------
People cannot say how good a completion is on an absolute scale, but they can say which of two they prefer.
The Bradley–Terry model (1952) turns a hidden scalar reward into such comparisons::

    P(y_w ≻ y_l | x) = σ( r(x, y_w) − r(x, y_l) )

and the reward model is its maximum-likelihood fit, logistic regression on score differences (InstructGPT,
Ouyang et al. 2022, eq. 1)::

    L_RM(φ) = − E_{(x, y_w, y_l)} [ log σ( r_φ(x, y_w) − r_φ(x, y_l) ) ]  [ + η · E (r_φ(x, y_w) + r_φ(x, y_l))² ]

The loss sees only differences, so r_φ is defined up to a constant per prompt; the optional centering term
(η, TRL's ``center_rewards_coefficient``, Eisenstein et al. 2023) pins the scores near 0.

The labels are noisy: the gold reward itself disagrees with some of them. ``eval/bayes_accuracy`` is the
accuracy of the gold reward on the held-out labels, the ceiling to compare ``eval/accuracy`` against.

==========================  ==============================================
symbol                      code
==========================  ==============================================
r_φ(x, y_w), r_φ(x, y_l)    ``chosen_rewards``, ``rejected_rewards`` (B,)
η                           ``cfg.center_weight``
r_φ                         ``ScalarModel.score`` (LM trunk + its own adapter + linear head) or an
                            ``AutoModelForSequenceClassification`` (``SequenceClassifierReward``)
==========================  ==============================================

The reward model scores text, so it may use a different tokenizer from the policy it will judge:
``load_reward_model(path)`` returns a ``RewardScorer``, ``scorer(prompts, completions) -> (B,)``.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lab import dist
from lab.batching import encode_completions, encode_preference_batch
from lab.config import PreferenceDataConfig, check, opt
from lab.data import load_preference_rows
from lab.runner import (
    Run,
    clip_and_step,
    make_optimizer,
    seed_everything,
    shuffled_batches,
    use_one_thread_for_tiny_models,
)


@dataclass
class RewardConfig(PreferenceDataConfig):
    """Train a Bradley–Terry reward model on preference pairs."""

    reward_model: str | None = opt(
        None,
        "base of the reward model (builtin name, local path, hub id, or an "
        "AutoModelForSequenceClassification); default: --model, else the task's model",
    )
    center_weight: float = opt(
        0.0, "η: weight of the centering term η·mean((r_w + r_l)²); 0 disables", min=0.0, max=10.0
    )
    mode: str = opt("full", "full (all weights), lora (peft adapters) or qlora (4-bit nf4 base + adapters)")
    steps: int = opt(300, "optimizer steps", min=1, max=1_000_000)
    lr_decay: bool = opt(
        True,
        "decay the learning rate linearly to 0 over the run (the HF Trainer default); "
        "the last steps then refine instead of chasing label noise",
    )
    eval_every: int = opt(100, "held-out accuracy / Spearman every N steps (0: at the end only)", min=0, max=1_000_000)
    eval_pairs: int = opt(500, "held-out pairs used for eval/* metrics", min=1, max=1_000_000)


# ----------------------------------------------------------------------------------------------------------------------
# the loss


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, center_weight: float = 0.0):
    """Bradley–Terry negative log-likelihood, plus the optional centering term::

        L = mean_B [ − log σ(r_w − r_l) ]  +  η · mean_B [ (r_w + r_l)² ]

    chosen_rewards, rejected_rewards: (B,). Returns (loss, metrics).
    """
    margin = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(margin).mean()
    if center_weight > 0:
        loss = loss + center_weight * ((chosen_rewards + rejected_rewards) ** 2).mean()
    with torch.no_grad():
        metrics = {
            "loss/rm": loss.detach(),
            "rm/accuracy": (margin > 0).float().mean(),
            "rm/margin": margin.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# scoring preference pairs


def _score_rows(
    model, tokenizer, rows: list[dict], max_length: int, device, *, with_tokens: bool = False
) -> tuple[torch.Tensor, ...]:
    """r_φ of chosen and rejected for preference rows: one forward pass over 2B sequences -> (B,), (B,)
    (``with_tokens``: and the number of real tokens scored)."""
    batch = encode_preference_batch(tokenizer, rows, max_length).to(device)  # (2B, L) chosen rows first
    scores = model.score(batch.input_ids, batch.attention_mask)  # (2B,)
    chosen, rejected = scores.chunk(2)  # (B,), (B,)
    return (chosen, rejected, int(batch.attention_mask.sum())) if with_tokens else (chosen, rejected)


# ----------------------------------------------------------------------------------------------------------------------
# reward models: the lab's ScalarModel, or any AutoModelForSequenceClassification


class SequenceClassifierReward(nn.Module):
    """An ``AutoModelForSequenceClassification`` (one label) with the interface of :class:`lab.modeling.ScalarModel`:
    ``score(input_ids, attention_mask) -> (B,)``, ``tokenizer``, ``save(path)``, ``trainable_parameters()``.

    The model's own pooling picks the last non-pad token, as it did when it was trained."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the pooling needs it to find the last token

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
        return logits[:, 0].float()  # (B,)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    save_pretrained = save


def _is_sequence_classifier(path: str, trust_remote_code: bool) -> bool:
    """Whether ``path`` holds an AutoModelForSequenceClassification (its config's architectures say so)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _load_sequence_classifier(
    name: str, mode: str, lora_r: int, lora_alpha: int, device: str, trust_remote_code: bool
) -> SequenceClassifierReward:
    from transformers import AutoModelForSequenceClassification

    from lab.modeling import load_tokenizer, pick_device, pick_dtype, resolve_model_path

    check(mode in ("full", "lora"), "mode", "a sequence-classification reward model trains in full or lora mode")
    dev = pick_device(device)
    path = resolve_model_path(name)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=pick_dtype(dev), use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(dev)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # SEQ_CLS keeps the classification head trainable next to the adapters
        model = get_peft_model(
            model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear", task_type="SEQ_CLS")
        )
    return SequenceClassifierReward(model, load_tokenizer(name, trust_remote_code))


def load_reward_backbone(cfg: RewardConfig, task=None, prompts: list | None = None):
    """A fresh (or continued) reward model for ``cfg``: a ScalarModel, or a SequenceClassifierReward when
    ``cfg.reward_model`` is a sequence classifier. Given the data's ``prompts``, chat messages without a chat
    template fail in one line before the model loads."""
    from lab.modeling import check_prompts_fit_tokenizer, load_scalar_model, load_tokenizer, resolve_model_path

    name = cfg.reward_model or cfg.model or (task.model if task is not None else None)
    if name is None:
        raise ValueError("a data source that is not a built-in task needs --reward-model (or --model)")
    if prompts:
        check_prompts_fit_tokenizer(prompts, load_tokenizer(name, cfg.trust_remote_code), name)
    path = resolve_model_path(name)
    if os.path.exists(os.path.join(path, "scalar_head.pt")):
        return _load_saved_scalar(path, device=cfg.device, trainable=True)
    if _is_sequence_classifier(path, cfg.trust_remote_code):
        return _load_sequence_classifier(name, cfg.mode, cfg.lora_r, cfg.lora_alpha, cfg.device, cfg.trust_remote_code)
    model, _ = load_scalar_model(
        name,
        mode=cfg.mode,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model


def _load_saved_scalar(path: str, device: str = "auto", trainable: bool = False):
    """A ScalarModel saved by ``ScalarModel.save``: adapter + head (lora), or full weights + head."""
    from lab.modeling import _is_adapter_dir, load_scalar_model

    if _is_adapter_dir(path):
        model, _ = load_scalar_model(path, device=device)
    else:  # full mode: the folder is a causal LM; load it and put the saved head on top
        model, _ = load_scalar_model(path, mode="full", device=device)
        # weights_only: a checkpoint folder is data, and must not be able to run code when it is unpickled
        head_file = os.path.join(path, "scalar_head.pt")
        try:
            head = torch.load(head_file, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError (not tensors only), a truncated file, ...
            from lab.modeling import BadModelFiles

            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadModelFiles(f"{head_file} cannot be loaded as plain tensors: {reason[:200]}") from None
        model.head.load_state_dict(head)
    if not trainable:
        model.requires_grad_(False).eval()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# scoring text with a trained reward model (best-of-N, PPO, the app)


class RewardScorer:
    """r_φ(x, y) for text: ``scorer(prompts, completions, truncated=None) -> (B,) float32`` on the CPU.

    ``completions`` are decoded text without eos; ``truncated[i]`` True means completion i hit the length cap,
    so it is scored without eos, as in training. Rows go through the model ``batch_size`` at a time.
    """

    def __init__(self, model, tokenizer, *, name: str = "rm", batch_size: int = 64, max_length: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, truncated=None) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        if truncated is None:
            truncated = [False] * len(prompts)
        truncated = [bool(t) for t in (truncated.tolist() if torch.is_tensor(truncated) else truncated)]
        was_training = self.model.training
        self.model.eval()
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            sl = slice(i, i + self.batch_size)
            batch = encode_completions(
                self.tokenizer,
                list(prompts[sl]),
                list(completions[sl]),
                [not t for t in truncated[sl]],
                max_length=self.max_length,
            ).to(self.device)
            scores.append(self.model.score(batch.input_ids, batch.attention_mask).float().cpu())  # (b,)
        self.model.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0)  # (B,)


def _checkpoint_dir(path: str) -> str:
    """A run folder -> its latest checkpoint; a checkpoint folder -> itself."""
    p = Path(path)
    status = p / "status.json"
    if status.exists() and (p / "checkpoints").is_dir():
        tag = json.loads(status.read_text()).get("latest_checkpoint") or "final"
        return str(p / "checkpoints" / tag)
    return str(p)


def load_reward_model(path: str, *, device: str = "auto", batch_size: int = 64) -> RewardScorer:
    """A frozen reward model from a run folder, a checkpoint folder, or an AutoModelForSequenceClassification
    (local or hub id), ready to score text: ``load_reward_model(p)(prompts, completions) -> (B,)``."""
    from lab.modeling import ModelNotFound, load_tokenizer, resolve_model_path

    ckpt = resolve_model_path(_checkpoint_dir(str(path)))
    if os.path.exists(os.path.join(ckpt, "scalar_head.pt")):
        model = _load_saved_scalar(ckpt, device=device)
    elif os.path.exists(os.path.join(ckpt, "adapter_config.json")):  # a lora sequence classifier
        from peft import AutoPeftModelForSequenceClassification

        peft_model = AutoPeftModelForSequenceClassification.from_pretrained(ckpt, num_labels=1)
        model = SequenceClassifierReward(peft_model, load_tokenizer(ckpt))
    elif _is_sequence_classifier(ckpt, False):
        model = _load_sequence_classifier(ckpt, "full", 8, 16, device, False)
    else:
        raise ModelNotFound(
            f"{path!r} holds no reward model: expected a reward-model run folder, its checkpoint, "
            f"or an AutoModelForSequenceClassification"
        )
    model.requires_grad_(False).eval()
    return RewardScorer(model, model.tokenizer, name=f"rm:{path}", batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------------------
# held-out evaluation


def bayes_accuracy(rows: list[dict]) -> float:
    """How often the gold reward agrees with the (noisy) labels: [r_gold(y_w) > r_gold(y_l)], ties count ½."""
    agree = [
        1.0 if r["chosen_gold"] > r["rejected_gold"] else 0.5 if r["chosen_gold"] == r["rejected_gold"] else 0.0
        for r in rows
    ]
    return sum(agree) / len(agree)


def within_prompt_spearman(prompts: list, learned: list[float], gold: list[float]) -> float | None:
    """Mean over prompts of the Spearman rank correlation of learned and gold reward among that prompt's
    completions (one entry per distinct completion)::

        ρ_within = mean_x  ρ_Spearman( r_φ(x, ·), r_gold(x, ·) )

    Bradley–Terry identifies r only up to a constant per prompt (σ sees differences within a pair), so this is
    what a reward model can be asked to get right. Prompts with fewer than 3 completions or a constant gold reward
    are skipped (None when none is left); a constant learned reward on a prompt counts as 0, not as skipped, so a
    reward model that learned nothing there is not hidden.
    Naive equivalent: group by prompt, ``scipy.stats.spearmanr`` per group, average.
    """
    from scipy.stats import spearmanr

    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(str(prompt), []).append(i)
    per_prompt = []
    for indices in groups.values():
        g, r = [gold[i] for i in indices], [learned[i] for i in indices]
        if len(indices) < 3 or len(set(g)) < 2:
            continue
        per_prompt.append(float(spearmanr(r, g).statistic) if len(set(r)) > 1 else 0.0)
    return sum(per_prompt) / len(per_prompt) if per_prompt else None


@torch.no_grad()
def evaluate_reward_model(model, tokenizer, rows: list[dict], *, max_length: int = 256, batch_size: int = 128) -> dict:
    """Held-out pair accuracy, and, where rows carry gold rewards (``chosen_gold``, ``rejected_gold``), the Bayes
    accuracy and two rank correlations of r_φ with r_gold over the distinct completions: ``eval/spearman``
    within each prompt, averaged over prompts (the headline: Bradley–Terry fixes r only up to a per-prompt
    constant), and ``eval/spearman_pooled`` over all completions of all prompts at once, which per-prompt
    offsets pull down."""
    from scipy.stats import spearmanr

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for i in range(0, len(rows), batch_size):
        c, r = _score_rows(model, tokenizer, rows[i : i + batch_size], max_length, device)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)  # (N,), (N,)
    out = {"eval/accuracy": (chosen > rejected).float().mean().item(), "eval/margin": (chosen - rejected).mean().item()}
    if rows and all("chosen_gold" in r and "rejected_gold" in r for r in rows):
        learned, gold = {}, {}
        for row, rc, rr in zip(rows, chosen.tolist(), rejected.tolist()):
            for side, score in (("chosen", rc), ("rejected", rr)):
                key = (str(row["prompt"]), row[side], bool(row.get(f"{side}_truncated", False)))
                learned[key], gold[key] = score, row[f"{side}_gold"]
        keys = list(learned)
        scores, targets = [learned[k] for k in keys], [gold[k] for k in keys]
        within = within_prompt_spearman([k[0] for k in keys], scores, targets)
        if within is not None:
            out["eval/spearman"] = within
        out["eval/spearman_pooled"] = float(spearmanr(scores, targets).statistic)
        out["eval/bayes_accuracy"] = bayes_accuracy(rows)
    return out


def _heldout_rows(cfg: RewardConfig, rows: list[dict], task) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows: a built-in task's eval split, or else the last 10% of a seeded shuffle."""
    if task is not None:
        return rows, load_preference_rows(cfg, "eval")[: cfg.eval_pairs]
    shuffled = rows[:]
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = max(1, len(rows) // 10)
    return shuffled[:-n_eval], shuffled[-n_eval:][: cfg.eval_pairs]


# ----------------------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: RewardConfig, *, stop: threading.Event | None = None, record=None, policy=None) -> Iterator[dict]:
    """One optimizer step per ``next()``; checkpoints hold the reward model (adapter or weights, head, tokenizer).

    ``policy``: an already built reward model (anything with ``score``, ``tokenizer``, ``save``) to train instead
    of loading ``cfg.reward_model``."""
    from lab.tasks import TASKS, get_task

    seed_everything(cfg.seed)
    task = get_task(cfg.task) if cfg.task in TASKS else None
    if policy is not None and not hasattr(policy, "score"):
        raise TypeError(
            "rm.train(policy=...) takes a reward model (something with .score); to start from a causal "
            "LM, give its name as cfg.reward_model"
        )
    rows, eval_rows = _heldout_rows(cfg, load_preference_rows(cfg, "train"), task)
    model = policy or load_reward_backbone(cfg, task, [r["prompt"] for r in rows])
    # under FSDP sharded over the ranks (lab.dist), else as it is; a saved reward model with an adapter trains LoRA
    model = dist.shard_model(model, "lora" if getattr(model, "adapter_name", None) else cfg.mode)
    tokenizer = model.tokenizer
    device = next(model.parameters()).device
    use_one_thread_for_tiny_models(model)  # before the first evaluation; Run applies it again for a given model
    params = model.trainable_parameters()
    optimizer = make_optimizer(params, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / cfg.steps if cfg.lr_decay else 1.0)
    batches = shuffled_batches(rows, cfg.batch_size, cfg.seed)

    with Run(cfg, "rm", save=model, stop=stop, record=record, optimizer=optimizer, state=(schedule, batches)) as run:
        run.summary["rows"] = len(rows)
        for step in run.steps():
            # 1. batch: B pairs from shuffled epochs of the data
            batch_rows = dist.shard(next(batches))  # this process's pairs (all of them on one)
            # 2. score chosen and rejected in one forward pass
            model.train()
            chosen_rewards, rejected_rewards, tokens = _score_rows(
                model, tokenizer, batch_rows, cfg.max_length, device, with_tokens=True
            )
            # 3. loss
            loss, metrics = reward_loss(chosen_rewards, rejected_rewards, cfg.center_weight)
            # 4. update
            (loss / dist.world_size()).backward()  # a mean over equal shares: the summed gradients average them
            metrics["grad/norm"] = clip_and_step(optimizer, params, cfg.max_grad_norm)
            schedule.step()
            # 5. held-out accuracy, Spearman with the gold reward, and the Bayes limit
            if step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                heldout = evaluate_reward_model(model, tokenizer, eval_rows, max_length=cfg.max_length)
                metrics.update(heldout)
                run.summary["eval"] = heldout
            yield run.log(step, metrics, tokens=tokens)
