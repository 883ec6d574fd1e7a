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
`python -m lab.pretrain TASK`. Task data sampled from those models (the reviews pairs) comes from the one
sampler, `lab.sampling.generate`.
"""

from __future__ import annotations

from pathlib import Path

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
