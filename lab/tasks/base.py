"""The `Task` base class: prompts, fixed splits, a gold reward, and data for SFT and preferences.

A task is everything the methods need to know about a problem except the policy:

    train_prompts() / eval_prompts()   fixed, seeded splits (the same list on every call)
    gold_reward(prompt, completion)    the true reward r(x, y); `completion` is decoded text WITHOUT eos
    gold_rewards(prompts, completions, truncated)   the batch version; `truncated[i]` is True when
                                       completion i hit max_new_tokens without emitting eos
    sft_rows(split)                    [{"prompt", "completion"}] in the style of the pretraining data
    preference_rows(split)             [{"prompt", "chosen", "rejected", ...}] (graded and bandit tasks)

`kind` tells the methods what sort of reward to expect:

    "verifiable"  r ∈ {0, 1}, checked exactly (arith)           -> GRPO / REINFORCE on the gold reward
    "graded"      r ∈ ℝ, a score with failure modes (reviews)    -> reward model, PPO, DPO, over-optimization
    "bandit"      one-token responses, r known for every token   -> exact optimum π*, checked in closed form

Each built-in task ships a tiny policy in Hugging Face format under lab/models/<task.model>/, built by
`python -m lab.pretrain TASK`. This module also holds a minimal sampler used to build task data and to
check those models; the methods use the full sampler in lab/sampling.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Held-out split names: "eval" is canonical, "test" is accepted because data files often use it.
SPLITS = {"train": "train", "eval": "eval", "test": "eval"}

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"  # lab/models
DATA_DIR = Path(__file__).resolve().parent / "data"  # lab/tasks/data (shipped JSONL)


def normalize_split(split: str) -> str:
    """Map a split name to "train" or "eval", or say which names exist."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'eval' ('test' is an alias of 'eval')")
    return SPLITS[split]


def builtin_model_dir(name: str) -> Path:
    """Directory of a built-in model: lab/models/<name>."""
    return MODELS_DIR / name


def load_builtin(name: str):
    """Load a built-in model and its tokenizer, in eval mode, exactly as one would load a hub model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_dir(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"built-in model {name!r} not found at {path}; build it with `python -m lab pretrain {name}`"
        )
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


class Task:
    """A problem for RL on a language model. Subclasses fill in the class attributes and the methods."""

    name: str = ""
    kind: str = ""  # "verifiable" | "graded" | "bandit"
    model: str = ""  # name of the built-in model in lab/models/
    max_new_tokens: int = 16  # default completion budget for sampling
    tokenizer_level: str = "word"  # "char" | "word": how lab.pretrain builds the tokenizer
    description: str = ""  # one line, shown in listings

    # --- prompts -------------------------------------------------------------------------------
    def train_prompts(self) -> list[str]:
        raise NotImplementedError

    def eval_prompts(self) -> list[str]:
        raise NotImplementedError

    def prompts(self, split: str = "train") -> list[str]:
        """The prompts of a split ("train" or "eval")."""
        return self.train_prompts() if normalize_split(split) == "train" else self.eval_prompts()

    # --- rewards -------------------------------------------------------------------------------
    def gold_reward(self, prompt: str, completion: str, truncated: bool = False) -> float:
        """r(x, y) for one completion (decoded text without eos). `truncated`: no eos was emitted."""
        raise NotImplementedError

    def gold_rewards(
        self, prompts: list[str], completions: list[str], truncated: list[bool] | None = None
    ) -> list[float]:
        """Batch version of `gold_reward`. `truncated=None` means no completion was truncated."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        if truncated is None:
            truncated = [False] * len(prompts)
        truncated = [bool(t) for t in truncated]  # accepts a list or a (B,) bool tensor
        if len(truncated) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(truncated)} truncated flags")
        return [self.gold_reward(p, c, t) for p, c, t in zip(prompts, completions, truncated)]

    # --- data ----------------------------------------------------------------------------------
    def sft_rows(self, split: str = "train") -> list[dict]:
        """[{"prompt", "completion"}]: a fixed draw from the pretraining distribution on the split's prompts."""
        raise NotImplementedError

    def preference_rows(self, split: str = "train") -> list[dict]:
        """[{"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"}] for reward models and DPO."""
        raise NotImplementedError(
            f"task {self.name!r} (kind {self.kind!r}) has no preference data; the 'reviews' and 'bandit' tasks do"
        )

    # --- what lab.pretrain needs to build the built-in model -----------------------------------
    def vocabulary(self) -> list[str]:
        """Every token (character or word) the task's texts use, special tokens excluded."""
        raise NotImplementedError

    def sample_pretrain_rows(self, n: int, rng) -> list[dict]:
        """n fresh {"prompt", "completion"} rows from the pretraining distribution (`rng`: random.Random)."""
        raise NotImplementedError

    def regenerate_data(self, model_dir: Path) -> list[Path]:
        """Rebuild any shipped data that depends on the built-in model (called after pretraining it)."""
        return []

    def __repr__(self) -> str:
        return f"<Task {self.name} ({self.kind}): {self.description}>"


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> tuple[list[str], list[bool]]:
    """Minimal batched sampler: returns (completions without eos, truncated flags).

    Plain loop without a KV cache: our completions are at most ~16 tokens, so recomputing the
    whole sequence each step is cheap and keeps the code obviously correct. Prompts are left-padded
    and positions are counted from each row's first real token, so a padded row computes exactly
    what it would alone.
    """
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    completions: list[str] = []
    truncated: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        input_ids = enc["input_ids"].to(device)  # (B, P)
        attention_mask = enc["attention_mask"].to(device)  # (B, P)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)  # (B,)
        new_tokens = []
        for _ in range(max_new_tokens):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+t)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            logits = logits[:, -1, :].float()  # (B, V)
            if greedy:
                next_ids = logits.argmax(-1)  # (B,)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
                next_ids = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)  # (B,)
            # rows that already ended keep producing pad, masked out of attention
            next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
            new_tokens.append(next_ids)
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
            done = done | (next_ids == eos_id)
            if done.all():
                break
        completion_ids = torch.stack(new_tokens, dim=1).tolist()  # (B, T)
        for row in completion_ids:
            ended = eos_id in row
            row = row[: row.index(eos_id)] if ended else row
            completions.append(tokenizer.decode(row, skip_special_tokens=True))
            truncated.append(not ended)
    return completions, truncated
