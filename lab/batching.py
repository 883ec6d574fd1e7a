"""Turning (prompt, completion) text into padded tensors, and scoring completions under a model.

Every offline method (SFT, DPO, the reward model, the PPO-ptx term) needs the same three tensors for a batch of
prompt/completion pairs: the concatenated ids, the attention mask, and a mask of which positions are completion
tokens. Prompt and completion are tokenized separately and concatenated, so the boundary is exact even for
tokenizers that would merge across it.

Preference pairs (the reward model, DPO, SFT on preferred answers) are one batch of 2B rows, chosen rows first
(``encode_preference_batch``), so one forward pass scores both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lab.ops import completion_token_logprobs, masked_sum, selective_logprobs
from lab.sampling import encode_prompt, format_prompt, turn_end_token_id


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (B, L) right-padded prompt + completion (+ eos)
    attention_mask: torch.Tensor  # (B, L)
    completion_mask: torch.Tensor  # (B, L) 1 on completion tokens (the eos included)

    def to(self, device) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    def select(self, rows: slice | torch.Tensor) -> PairBatch:
        """The rows picked by ``rows`` (a slice or an index tensor), with the columns that are padding in every
        kept row cut off (right padding: real tokens come first). Naive equivalent: encoding those rows alone."""
        width = int(self.attention_mask[rows].sum(-1).max())
        return PairBatch(
            self.input_ids[rows, :width], self.attention_mask[rows, :width], self.completion_mask[rows, :width]
        )


def _text(value) -> str:
    """A completion given as messages (conversational data) becomes its assistant content."""
    if isinstance(value, list):
        return "".join(m["content"] for m in value)
    return value


def completion_end_token_id(tokenizer, prompt) -> int:
    """The token a finished completion of ``prompt`` ends with: the chat template's turn end for a conversational
    prompt (<|im_end|> in ChatML, <|eot_id|> in Llama 3, where the tokenizer's eos <|end_of_text|> would teach the
    model to end the whole document instead of its turn), the tokenizer's eos for a plain-text prompt."""
    if isinstance(prompt, list):
        end = turn_end_token_id(tokenizer)
        if end is not None:
            return end
    return tokenizer.eos_token_id


def encode_pairs(
    tokenizer, prompts: list, completions: list, *, add_eos: bool = True, max_length: int | None = None
) -> PairBatch:
    """Tokenize prompt and completion separately, concatenate, right-pad. Over-long rows lose prompt tokens
    from the left first, because the completion is what the loss is about. With ``add_eos`` each completion ends
    with ``completion_end_token_id`` (the turn end of the chat template for conversational prompts)."""
    rows, masks = [], []
    for prompt, completion in zip(prompts, completions):
        p = encode_prompt(tokenizer, format_prompt(tokenizer, prompt))  # one BOS, even if the template wrote it
        c = tokenizer(_text(completion), add_special_tokens=False)["input_ids"]
        if add_eos:
            c = c + [completion_end_token_id(tokenizer, prompt)]
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


def encode_completions(
    tokenizer, prompts: list, completions: list, ended: list[bool] | None = None, *, max_length: int | None = None
) -> PairBatch:
    """``encode_pairs`` with eos appended only to the completions that ended.

    A completion that hit the length cap (truncated) never emitted eos, and a graded task penalizes exactly
    that, so a model that scores or imitates it must see it without one. ``ended=None``: every row ended.
    Naive equivalent: encode each row alone with ``add_eos=ended[i]`` and right-pad them together.
    """
    if ended is None or all(ended):
        return encode_pairs(tokenizer, prompts, completions, add_eos=True, max_length=max_length)
    without = encode_pairs(tokenizer, prompts, completions, add_eos=False, max_length=max_length)
    if not any(ended):
        return without
    with_eos = encode_pairs(tokenizer, prompts, completions, add_eos=True, max_length=max_length)
    L = with_eos.input_ids.shape[1]  # ≥ the width without eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    grow = L - without.input_ids.shape[1]
    keep = torch.tensor(ended, dtype=torch.bool)[:, None]  # (B, 1)
    return PairBatch(
        torch.where(keep, with_eos.input_ids, F.pad(without.input_ids, (0, grow), value=pad)),  # (B, L)
        torch.where(keep, with_eos.attention_mask, F.pad(without.attention_mask, (0, grow))),  # (B, L)
        torch.where(keep, with_eos.completion_mask, F.pad(without.completion_mask, (0, grow))),  # (B, L)
    )


# ----------------------------------------------------------------------------------------------------------------------
# preference pairs


def ends_with_eos(task) -> bool:
    """Whether completions are scored with their eos. A bandit response is exactly one token and the episode
    ends without eos, so its log π(y|x) is that one token's log-prob."""
    return task is None or task.kind != "bandit"


def encode_preference_batch(tokenizer, rows: list[dict], max_length: int, add_eos: bool = True) -> PairBatch:
    """Chosen rows 0..B-1, rejected rows B..2B-1 of one right-padded batch, so one forward pass scores both.

    A completion the data marks as truncated (``chosen_truncated``: it hit the length cap) never emitted eos,
    so it is scored without one."""
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
    from lab.runner import auto_microbatch

    return cfg.microbatch_size or auto_microbatch(policy.model, cfg.batch_size, 2 * cfg.max_length)


def pair_logprobs(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs_chosen, logprobs_rejected, chosen_lengths, rejected_lengths), each (B,), from one forward pass
    over a batch built by ``encode_preference_batch``."""
    logprobs, lengths = sequence_logprob(model, batch)  # (2B,), (2B,)
    chosen, rejected = logprobs.chunk(2)  # (B,), (B,)
    chosen_lengths, rejected_lengths = lengths.chunk(2)  # (B,), (B,)
    return chosen, rejected, chosen_lengths, rejected_lengths


# ----------------------------------------------------------------------------------------------------------------------
# log-probs of a batch


def token_logprobs(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token_t | tokens_<t) for every position after the first, and the completion mask aligned to it.

    Returns ``(logprobs (B, L-1), mask (B, L-1))``; ``(logprobs * mask).sum(-1)`` is log π(y|x).
    Right padding keeps positions contiguous, so no position ids are needed.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L, V)
    logprobs = selective_logprobs(logits[:, :-1], batch.input_ids[:, 1:])  # (B, L-1): token t+1 given ≤ t
    return logprobs, batch.completion_mask[:, 1:].to(logprobs.dtype)


def sequence_logprob(model, batch: PairBatch, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) summed over completion tokens (or averaged when ``average``), and the token count. (B,), (B,)

    Naive equivalent: ``logprobs, mask = token_logprobs(model, batch); (logprobs * mask).sum(-1)``. Here the batch
    is laid out as left-padded prompts + right-padded completions (``prompt_completion_layout``) and scored by
    ``lab.ops.completion_token_logprobs``, which runs each distinct prompt once (a DPO batch has every prompt twice: chosen
    and rejected) and the LM head only where a completion token is predicted."""
    layout = prompt_completion_layout(batch)
    if layout is None:  # a row without prompt tokens: the plain forward pass
        logprobs, mask = token_logprobs(model, batch)  # (B, L-1)
        total, count = masked_sum(logprobs, mask, dim=-1), mask.sum(-1)  # (B,), (B,)
    else:
        input_ids, attention_mask, completion_mask = layout  # (B, P+T), (B, P+T), (B, T)
        T = completion_mask.shape[1]
        logprobs = completion_token_logprobs(model, input_ids, attention_mask, T)  # (B, T)
        completion_mask = completion_mask.to(logprobs.dtype)
        total, count = masked_sum(logprobs, completion_mask, dim=-1), completion_mask.sum(-1)  # (B,), (B,)
    return (total / count.clamp(min=1) if average else total), count


def prompt_completion_layout(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The rows of a right-padded ``PairBatch`` re-laid as a ``lab.sampling.Rollout`` lays them out::

        [x1 x2 y1 y2 y3 pad]  ->  [pad x1 x2 | y1 y2 y3]

    Returns ``(input_ids (B, P+T), attention_mask (B, P+T), completion_mask (B, T))``, or None when some row has
    no prompt token. A row's prompt is what precedes its first completion token."""
    is_completion = batch.completion_mask.bool() & batch.attention_mask.bool()  # (B, L)
    lengths = batch.attention_mask.sum(-1)  # (B,)
    prompt_lengths = torch.where(is_completion.any(-1), is_completion.long().argmax(-1), lengths)  # (B,)
    if int(prompt_lengths.min()) < 1:
        return None
    completion_lengths = lengths - prompt_lengths  # (B,)
    P, T = int(prompt_lengths.max()), max(int(completion_lengths.max()), 1)
    L = batch.input_ids.shape[1]
    column = torch.arange(L, device=batch.input_ids.device)[None, :]  # (1, L)
    # Gather each row's prompt into the right end of P columns and its completion into the left end of T columns.
    prompt_index = prompt_lengths[:, None] - P + column[:, :P]  # (B, P) negative: left padding
    completion_index = prompt_lengths[:, None] + column[:, :T]  # (B, T)
    prompt_ok = prompt_index >= 0  # (B, P)
    completion_ok = column[:, :T] < completion_lengths[:, None]  # (B, T)
    pad = batch.input_ids[0, 0].new_tensor(0)
    prompt_ids = torch.where(prompt_ok, batch.input_ids.gather(1, prompt_index.clamp(min=0)), pad)  # (B, P)
    completion_ids = torch.where(
        completion_ok, batch.input_ids.gather(1, completion_index.clamp(max=L - 1)), pad
    )  # (B, T)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+T)
    completion_mask = completion_ok.long()  # (B, T)
    attention_mask = torch.cat([prompt_ok.long(), completion_mask], dim=1)  # (B, P+T)
    return input_ids, attention_mask, completion_mask
