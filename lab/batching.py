"""Turning (prompt, completion) text into padded tensors, and scoring completions under a model.

Every offline method (SFT, DPO, the reward model, the PPO-ptx term) needs the same three tensors for a batch of
prompt/completion pairs: the concatenated ids, the attention mask, and a mask of which positions are completion
tokens. Prompt and completion are tokenized separately and concatenated, so the boundary is exact even for
tokenizers that would merge across it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.ops import selective_logprobs
from lab.sampling import format_prompt


@dataclass
class PairBatch:
    input_ids: torch.Tensor        # (B, L) right-padded prompt + completion (+ eos)
    attention_mask: torch.Tensor   # (B, L)
    completion_mask: torch.Tensor  # (B, L) 1 on completion tokens (the eos included)

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))


def _text(value) -> str:
    """A completion given as messages (conversational data) becomes its assistant content."""
    if isinstance(value, list):
        return "".join(m["content"] for m in value)
    return value


def encode_pairs(tokenizer, prompts: list, completions: list, *, add_eos: bool = True,
                 max_length: int | None = None) -> PairBatch:
    """Tokenize prompt and completion separately, concatenate, right-pad. Over-long rows lose prompt tokens
    from the left first, because the completion is what the loss is about."""
    rows, masks = [], []
    for prompt, completion in zip(prompts, completions):
        p = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=True)["input_ids"]
        c = tokenizer(_text(completion), add_special_tokens=False)["input_ids"]
        if add_eos:
            c = c + [tokenizer.eos_token_id]
        if max_length is not None and len(p) + len(c) > max_length:
            keep = max(max_length - len(c), 1)
            p, c = p[-keep:], c[: max_length - keep]
        rows.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    L = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), L), pad, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)  # (B, L)
    completion_mask = torch.zeros((len(rows), L), dtype=torch.long)  # (B, L)
    for i, (r, m) in enumerate(zip(rows, masks)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        completion_mask[i, : len(r)] = torch.tensor(m)
    return PairBatch(input_ids, attention_mask, completion_mask)


def token_logprobs(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token_t | tokens_<t) for every position after the first, and the completion mask aligned to it.

    Returns ``(logprobs (B, L-1), mask (B, L-1))``; ``(logprobs * mask).sum(-1)`` is log π(y|x).
    Right padding keeps positions contiguous, so no position ids are needed.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L, V)
    logprobs = selective_logprobs(logits[:, :-1], batch.input_ids[:, 1:])  # (B, L-1): token t+1 given ≤ t
    return logprobs, batch.completion_mask[:, 1:].to(logprobs.dtype)


def sequence_logprob(model, batch: PairBatch, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) summed over completion tokens (or averaged when ``average``), and the token count. (B,), (B,)"""
    logprobs, mask = token_logprobs(model, batch)  # (B, L-1)
    total = (logprobs * mask).sum(-1)  # (B,)
    count = mask.sum(-1)  # (B,)
    return (total / count.clamp(min=1) if average else total), count
