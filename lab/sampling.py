"""Batched sampling from a causal LM, written out as an explicit loop, and prompt formatting.

    y_t ~ softmax(z_t / τ) restricted to the top-p nucleus,   z_t = f_θ(x, y_<t)

`generate` is our own loop rather than `model.generate`, so the whole path from prompt to
completion mask can be read in one place:

    1. tokenize and left-pad the prompts          prompt_ids (B, P), prompt_mask (B, P)
    2. prefill: one forward pass over the distinct prompts, keep the KV cache
    3. decode: pick a token, feed it back, one position at a time, until every row ended
    4. masks: completion_mask is 1 up to and including the first end token (`lab.ops.completion_mask`)

A row ends at any of `end_token_ids`: the tokenizer's EOS, the model's generation_config EOS ids
and the chat template's turn end (Llama 3 ends turns with <|eot_id|>, not its EOS).

Fast paths, each checked against the plain path in tests/test_sampling.py: LoRA adapters are
merged into the base weights while sampling (`merged_adapters`), a prompt repeated G times is
prefilled once, and plain temperature sampling uses the Gumbel-max trick (no softmax).

Why left padding: the next token of every row is then read at the same column (the last one),
and new tokens are appended on the right for all rows at once.

Shape legend: B batch, P prompt length, T completion length, V vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from lab import dist
from lab.ops import (
    cache_kwargs,
    completion_mask,
    position_ids_from_mask,
    prefill_shared,
    returned_cache,
)


@dataclass
class Rollout:
    """A batch of prompts and the completions sampled for them.

    The token tensors are laid out so `input_ids` / `attention_mask` can go straight into a
    forward pass (e.g. `lab.ops.completion_token_logprobs(model, r.input_ids, r.attention_mask,
    r.completion_ids.shape[1])`):

        [pad pad x1 x2 x3 | y1 y2 EOS pad]
         prompt (left-padded) completion (right-padded after EOS)
    """

    prompts: list[str]  # B prompt strings, as given to `generate`
    completions: list[str]  # B decoded completions, without EOS and special tokens
    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) long, 0 on padding
    completion_ids: torch.Tensor  # (B, T) long, pad_token_id after EOS
    completion_mask: torch.Tensor  # (B, T) long, 1 up to and including the first EOS
    truncated: torch.Tensor  # (B,) bool, True when the row never emitted EOS

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P+T) prompt and completion ids side by side."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P+T) prompt and completion masks side by side."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on `device` (the strings are shared)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Rollout(**moved)

    def select(self, index: int | slice | list[int] | torch.Tensor) -> Rollout:
        """The rows picked by `index` (an int, a slice, a list of ints, or an index / bool tensor).

        Used to cut a rollout batch into minibatches. Shapes P and T are kept as they are.
        """
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        rows = torch.arange(len(self))[index].reshape(-1)  # (B',) the same rules as tensor indexing
        row_list = rows.tolist()
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[rows.to(value.device)]
            else:
                picked[f.name] = [value[i] for i in row_list]
        return Rollout(**picked)


# --------------------------------------------------------------------------------------------
# Token choice
# --------------------------------------------------------------------------------------------


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-p nucleus to −inf (Holtzman et al. 2020, nucleus sampling).

    The nucleus is the smallest set of most likely tokens whose probabilities add up to at least
    `top_p`. The most likely token is always kept, so a tiny `top_p` gives greedy decoding.

    Naive equivalent, per row: sort the probabilities in decreasing order, walk down the list
    adding each token to the nucleus until the running sum reaches top_p.

    Args:
        logits: (B, V).
        top_p: in (0, 1]; 1 keeps everything.
    Returns:
        (B, V), a new tensor.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    # stable=True: among tied logits the lowest id comes first, as with argmax, so tiny top_p
    # gives exactly greedy decoding.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # (B, V), (B, V)
    sorted_probs = sorted_logits.float().softmax(dim=-1)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) probability of the tokens ranked above
    # A token is in the nucleus while the tokens above it have not yet reached top_p. The most
    # likely token has nothing above it (mass 0 < top_p), so it is always kept.
    drop_sorted = mass_before >= top_p  # (B, V)
    drop = drop_sorted.scatter(-1, sorted_ids, drop_sorted)  # (B, V) back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _next_token(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,)."""
    if greedy:
        return logits.argmax(dim=-1)  # (B,)
    # Draw on the generator's device, so one CPU generator reproduces the same samples wherever
    # the model runs.
    draw_device = generator.device if generator is not None else logits.device
    if top_p == 1.0:
        # Gumbel-max trick: argmax_v (z_v/τ + g_v) with g_v = −log E_v, E_v ~ Exp(1) i.i.d., is an exact
        # sample from softmax(z/τ) (Gumbel 1954; Maddison et al. 2014). It needs no normalized probabilities
        # and no cumulative sum over V, only one random number per logit.
        noise = torch.empty(logits.shape, device=draw_device).exponential_(generator=generator)  # (B, V)
        scores = logits / temperature - noise.to(logits.device).log()  # (B, V)
        return scores.argmax(dim=-1)  # (B,)
    logits = top_p_filter(logits / temperature, top_p)  # (B, V) temperature first, then the nucleus
    probs = logits.softmax(dim=-1)  # (B, V)
    ids = torch.multinomial(probs.to(draw_device), num_samples=1, generator=generator)  # (B, 1)
    return ids.squeeze(-1).to(logits.device)  # (B,)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> ids (B, P) left-padded with pad_token_id, mask (B, P)."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_token_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(rows), P), dtype=torch.long)  # (B, P)
    for b, row in enumerate(rows):
        if row:
            ids[b, P - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[b, P - len(row) :] = 1
    return ids, mask


def _pad_columns(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
    """Pad a (B, L) tensor to (B, width) with `value`, on the left or on the right."""
    missing = width - x.shape[1]
    return F.pad(x, (missing, 0) if left else (0, missing), value=value)


def _pad_token_id(tokenizer) -> int:
    # Tokenizers without a pad token (GPT-2, Llama) pad with EOS. The masks never look at the pad
    # id: prompt masks come from the tokenizer, completion masks from the first EOS.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return pad


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dist.full_weights  # under FSDP every rank holds the whole model while it samples (lab.dist.gathered)
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Rollout:
    """Sample one completion per prompt.

    Args:
        model: a causal LM (HF `PreTrainedModel` or a PEFT wrapper) that takes `attention_mask`,
            `position_ids`, a KV cache and `use_cache`.
        tokenizer: its tokenizer. A completion ends at any of `end_token_ids(tokenizer, model)`;
            `pad_token_id` (or EOS when there is none) fills the padding.
        prompts: B prompt strings (see `format_prompt` for chat messages).
        max_new_tokens: the most tokens a completion may have.
        temperature: τ in softmax(z / τ); ignored when greedy.
        top_p: nucleus size, in (0, 1]; ignored when greedy.
        greedy: take the argmax instead of sampling.
        generator: a `torch.Generator` to make sampling reproducible.
        batch_size: at most this many prompts per forward pass; the pieces are padded to common
            P and T and joined. None: all prompts at once.
    Returns:
        A `Rollout` with B rows, on the model's device. T ≤ max_new_tokens: the loop stops as soon
        as every row has ended.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if not prompts:
        raise ValueError("prompts is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")

    # Conversational prompts (lists of messages) go through the tokenizer's chat template, as in training.
    prompts = [p if isinstance(p, str) else format_prompt(tokenizer, p) for p in prompts]
    batch_size = batch_size or len(prompts)
    end_ids = end_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with torch.no_grad(), merged_adapters(model):
            pieces = [
                _generate_batch(
                    model,
                    tokenizer,
                    prompts[i : i + batch_size],
                    max_new_tokens,
                    temperature,
                    top_p,
                    greedy,
                    generator,
                    end_ids,
                )
                for i in range(0, len(prompts), batch_size)
            ]
    finally:
        model.train(was_training)
    return pieces[0] if len(pieces) == 1 else _concat(pieces, _pad_token_id(tokenizer))


def _generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | None,
    end_ids: list[int],
) -> Rollout:
    """The sampling loop for one batch of prompts (see `generate`)."""
    device = _model_device(model)
    pad_token_id = _pad_token_id(tokenizer)

    # 1. Tokenize (with the tokenizer's special tokens, unless the text already has its BOS), then
    #    left-pad ourselves, whatever the tokenizer's padding_side is.
    rows = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    for prompt, row in zip(prompts, rows):
        if not row:
            raise ValueError(f"prompt {prompt!r} has no tokens; the model needs at least one to condition on")
    prompt_ids, prompt_mask = _left_pad(rows, pad_token_id)  # (B, P), (B, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    B, P = prompt_ids.shape

    # 2. Prefill: run the prompts once; the cache keeps their keys and values for later steps.
    # GRPO's G copies of a prompt share one prefill (lab.ops.prefill_shared)
    last_logits, past_key_values = prefill_shared(model, prompt_ids, prompt_mask)  # (B, 1, V), cache of B rows
    next_logits = last_logits[:, -1, :].float()  # (B, V) left padding: every row ends at the last column
    next_position = position_ids_from_mask(prompt_mask)[:, -1:] + 1  # (B, 1) padding does not shift positions
    # The whole mask is allocated once; step t reads its first P + t + 1 columns (a view, no copy).
    attention_mask = F.pad(prompt_mask, (0, max_new_tokens), value=1)  # (B, P + max_new_tokens)

    # 3. Decode one token per step.
    stop = torch.tensor(end_ids, dtype=torch.long, device=device)  # (S,) any of them ends a row
    # `done.all()` makes the host wait for the device; on a GPU ask only every few steps (a few wasted
    # steps at the end cost less than a sync per step). On the CPU there is nothing to wait for.
    check_every = 1 if device.type == "cpu" else 8
    cache_name = next(iter(cache_kwargs(model, None)))  # "cache" or "past_key_values", by transformers version
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) row has ended
    new_tokens = []
    for step in range(max_new_tokens):
        token = _next_token(next_logits, temperature, top_p, greedy, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)  # finished rows emit padding
        new_tokens.append(token)
        done = done | torch.isin(token, stop)
        if step == max_new_tokens - 1 or ((step + 1) % check_every == 0 and done.all()):
            break  # no forward pass for a token nobody will read
        out = model(
            input_ids=token[:, None],
            attention_mask=attention_mask[:, : P + step + 1],
            position_ids=next_position,
            use_cache=True,
            **{cache_name: past_key_values},
        )
        next_logits = out.logits[:, -1, :].float()  # (B, V)
        past_key_values = returned_cache(out)
        next_position = next_position + 1  # (B, 1)
    completion_ids = torch.stack(new_tokens, dim=1)  # (B, T)

    # 4. Masks come from the first end token, never from the pad id (which may equal EOS).
    mask, truncated = completion_mask(completion_ids, end_ids)  # (B, T), (B,)
    if check_every > 1:  # drop the all-padding columns of the steps run after every row had ended
        T = max(int(mask.sum(-1).max()), 1)
        completion_ids, mask = completion_ids[:, :T], mask[:, :T]  # (B, T)
    return Rollout(
        prompts=list(prompts),
        completions=_decode(tokenizer, completion_ids, mask, truncated),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        truncated=truncated,
    )


def _decode(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, truncated: torch.Tensor) -> list[str]:
    """Text of each completion, up to but not including its EOS."""
    n_text = mask.sum(-1) - (~truncated).long()  # (B,) tokens before the EOS
    rows = [ids[:n] for ids, n in zip(completion_ids.tolist(), n_text.tolist())]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _concat(pieces: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts row-wise: prompts left-padded to a common P, completions right-padded to a common T."""
    P = max(r.prompt_ids.shape[1] for r in pieces)
    T = max(r.completion_ids.shape[1] for r in pieces)
    return Rollout(
        prompts=[p for r in pieces for p in r.prompts],
        completions=[c for r in pieces for c in r.completions],
        prompt_ids=torch.cat([_pad_columns(r.prompt_ids, P, pad_token_id, left=True) for r in pieces]),
        prompt_mask=torch.cat([_pad_columns(r.prompt_mask, P, 0, left=True) for r in pieces]),
        completion_ids=torch.cat([_pad_columns(r.completion_ids, T, pad_token_id, left=False) for r in pieces]),
        completion_mask=torch.cat([_pad_columns(r.completion_mask, T, 0, left=False) for r in pieces]),
        truncated=torch.cat([r.truncated for r in pieces]),
    )


# --------------------------------------------------------------------------------------------
# Prompt formatting
# --------------------------------------------------------------------------------------------


def _is_message(message) -> bool:
    return isinstance(message, dict) and {"role", "content"} <= message.keys()


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text to feed the model for `prompt`.

    - a string is returned unchanged;
    - a conversation (a list of {"role": ..., "content": ...} messages) goes through the
      tokenizer's chat template, ending with the assistant's turn header
      (`add_generation_prompt=True`) so the model answers as the assistant.

    Some chat templates (Llama 3) write the BOS token into the text; `encode_prompt` then
    tokenizes without adding a second one.
    """
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not all(_is_message(m) for m in prompt):
        raise TypeError('prompt must be a string or a list of {"role": ..., "content": ...} messages')
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt is a list of chat messages but the tokenizer has no chat_template; "
            "pass the prompt as a plain string, or use a tokenizer that has a chat template"
        )
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------------------------
# Special tokens of real models
#
#   Qwen2 (ChatML)  no BOS; eos <|im_end|> ends a turn (base models: eos <|endoftext|>)
#   Llama 3         the template writes <|begin_of_text|> and the tokenizer adds it too; eos is
#                   <|end_of_text|> but turns end with <|eot_id|> (generation_config lists both)
#   GPT-2           <|endoftext|> only, no template
# --------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt text: the tokenizer's special tokens are added unless the text
    already starts with its BOS.

    Llama 3's chat template writes `<|begin_of_text|>` into the text and its tokenizer adds
    another, so a templated prompt would start with two BOS tokens, a sequence the model never
    saw in training. TRL makes the same check (on `tokenizer.bos_token`).

    Naive equivalent: `tokenizer(text)["input_ids"]` with a doubled leading BOS cut to one.
    """
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = isinstance(bos, str) and bool(bos) and text.startswith(bos)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


_PROBE = "lab turn probe"


def turn_end_token_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in the tokenizer's chat template.

    <|im_end|> for ChatML (Qwen), <|eot_id|> for Llama 3; the EOS when there is no template or
    the template closes a turn with plain text. Read off the template itself rather than from
    a list of known names: render a one-exchange conversation whose answer is a probe string
    and take the first token after the probe, when it is a special token.
    """
    eos = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return eos
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, KeyError, TypeError):  # a template may reject this exchange: keep the EOS
        return eos
    at = text.rfind(_PROBE) if isinstance(text, str) else -1
    if at < 0:
        return eos
    tail = tokenizer(text[at + len(_PROBE) :], add_special_tokens=False)["input_ids"]
    return tail[0] if tail and tail[0] in set(tokenizer.all_special_ids) else eos


def end_token_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS ∪ the model's
    `generation_config.eos_token_id` (an int or a list) ∪ the chat template's turn end.

    `model.generate` stops on the generation config's ids; Meta-Llama-3-Instruct's tokenizer has
    eos <|end_of_text|> while its turns end with <|eot_id|>, so the tokenizer's EOS alone would
    sample on past the end of the answer. The turn end is included because the offline trainers
    end their completions with it (`lab.batching.encode_pairs`): the sampler stops where the
    trainers teach the model to stop.
    """
    ids = [tokenizer.eos_token_id, turn_end_token_id(tokenizer)]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))  # unique, in order


# --------------------------------------------------------------------------------------------
# Sampling through merged LoRA weights
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def merged_adapters(model: torch.nn.Module):
    """Inside the block, each LoRA layer computes (W + s·BA)x as one matrix product instead of
    Wx + s·B(Ax).

    Decoding runs the model one token at a time, so the two extra small matmuls per layer cost
    about as much as the big one at small sizes (1.58× slower sampling at 1M parameters, 1.07×
    at 20M). The outputs are the same up to float rounding (tests/test_sampling.py).

    Not peft's merge/unmerge: W + Δ − Δ moves each weight by a rounding error, and over hundreds of
    steps the base (which is also π_ref) would drift. Instead each base weight's tensor is swapped
    for a merged copy, with the adapters switched off, and the original tensor is put back on the
    way out, bit for bit. The copy costs the size of the adapted weights while sampling.

    Merged only where it is exact enough: float32 base weights (in bf16 the sum W + Δ would round
    most of a small Δ away), an active adapter that is not switched off (`disable_adapter()`, the
    reference policy), nothing merged already, and no quantized base (a 4-bit weight cannot absorb
    Δ). Elsewhere the block changes nothing.
    """
    layers = _lora_layers(model)
    mergeable = (
        bool(layers)
        and hasattr(model, "disable_adapter")
        and all(
            not layer.merged
            and not layer.disable_adapters
            and isinstance(getattr(layer.get_base_layer(), "weight", None), torch.nn.Parameter)
            # float32 only: in bf16, W + Δ rounds most of a small Δ away (W ~ 0.02, Δ ~ 1e-4 after a few steps: about
            # half the entries would not move), and sampling would come from nearly the base policy
            and layer.get_base_layer().weight.dtype == torch.float32
            for layer in layers
        )
    )
    if not mergeable:
        yield model
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                merged = weight.data
                for name in layer.active_adapters:
                    if name in getattr(layer, "lora_A", {}):
                        merged = merged + layer.get_delta_weight(name).to(merged.dtype)  # a new tensor
                originals.append((weight, weight.data))
                weight.data = merged
        with model.disable_adapter():  # the LoRA branch is inside the weights now
            yield model
    finally:
        for weight, data in originals:
            weight.data = data


def _lora_layers(model: torch.nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no adapters
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
