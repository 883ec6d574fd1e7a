"""Shared, method-agnostic math: log-probs, masked statistics, KL estimators, completion masks.

Everything here is a pure function (tensors in, tensors out) apart from the two `completion_token_*`
helpers, which run one forward pass of a model and nothing else. No function here knows which
method (PPO, DPO, GRPO, ...) calls it.

Each helper names its naive equivalent in its docstring; `tests/test_ops.py` checks it against
that equivalent.

Shape legend: B batch, G group size, P prompt length, T completion length, V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

# Rows (token positions) per chunk when we compute log-softmax pieces. 1024 rows of a 32k
# vocabulary in float32 are 128 MB, which keeps the peak small even for big vocabularies.
DEFAULT_CHUNK_SIZE = 1024


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def selective_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Log-probability of the selected tokens, in float32.

        log π(y_t) = z_t[y_t] − logsumexp_v z_t[v]

    Naive equivalent:
        logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    The naive version builds a float32 (..., V) tensor of log-probs to read one number per row.
    Here we gather the selected logit and subtract the row's logsumexp, `chunk_size` rows at a
    time, so only a (chunk_size, V) float32 block exists at once. For float32 inputs `.float()`
    is a no-op; for bf16/fp16 inputs it upcasts one chunk, because logsumexp in half precision
    loses several digits.

    Args:
        logits: (..., V), e.g. (B, T, V). Any float dtype. Gradients flow through.
        ids: (...), e.g. (B, T), the token ids to score.
        chunk_size: rows per chunk.
    Returns:
        (...) float32 log-probs, e.g. (B, T).
    """
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} must agree except for V")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V)  # (N, V) with N = B*T; a view when logits are contiguous
    flat_ids = ids.reshape(-1)  # (N,)
    pieces = []
    for start in range(0, flat_ids.numel(), chunk_size):
        rows = flat_logits[start : start + chunk_size].float()  # (n, V) float32
        rows_ids = flat_ids[start : start + chunk_size].unsqueeze(-1)  # (n, 1)
        picked = rows.gather(-1, rows_ids).squeeze(-1)  # (n,)
        pieces.append(picked - rows.logsumexp(-1))  # (n,)
    if not pieces:  # no rows at all (B = 0 or T = 0)
        return logits.new_zeros(ids.shape, dtype=torch.float32)
    return torch.cat(pieces).view(ids.shape)  # (...)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy of the softmax distribution of each row, in float32.

        H_t = − Σ_v π(v) log π(v),   π = softmax(z_t)

    Naive equivalent:
        logp = logits.float().log_softmax(-1); -(logp.exp() * logp).sum(-1)

    Computed `chunk_size` rows at a time for the same memory reason as `selective_logprobs`.

    Args:
        logits: (..., V), e.g. (B, T, V).
    Returns:
        (...) float32 entropies in nats, e.g. (B, T).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V)  # (N, V)
    pieces = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        logp = flat_logits[start : start + chunk_size].float().log_softmax(-1)  # (n, V)
        pieces.append(-(logp.exp() * logp).sum(-1))  # (n,)
    if not pieces:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(pieces).view(logits.shape[:-1])  # (...)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only real (unmasked) tokens; 0 on left padding.

        position_ids = clamp(cumsum(mask) − 1, min=0)

    With left padding, row [pad, pad, a, b] gets positions [0, 0, 0, 1], so a prompt has the
    same positions whether it is alone or in a padded batch.

    Args:
        attention_mask: (B, L) of 0/1.
    Returns:
        (B, L) long.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` takes `logits_to_keep` (HF causal LMs do since transformers 4.45).

    With it, the LM head runs only on the positions we ask for, so we never build (B, P+T, V)
    logits just to throw the prompt part away. PEFT wrappers forward keyword arguments to the
    base model, so we look at the base model's signature.
    """
    return _forward_accepts(model, "logits_to_keep")


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """`{name: cache}` for passing a KV cache to `model.forward`: transformers ≥ 5.2x calls the argument `cache`
    (`past_key_values` still works there, with a deprecation warning), older versions `past_key_values`."""
    return {"cache" if _forward_accepts(model, "cache") else "past_key_values": cache}


def returned_cache(output):
    """The KV cache a forward pass returned (`output.cache`, or `output.past_key_values` before the rename)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _forward_accepts(model: torch.nn.Module, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # forward without an inspectable signature
        return False


def _completion_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    temperature: float,
    share_prompts: bool = True,
) -> torch.Tensor:
    """Logits that predict the last `completion_len` tokens: (B, T, V), divided by temperature."""
    L = input_ids.shape[1]  # L = P + T
    T = completion_len
    if not 1 <= T < L:
        raise ValueError(f"completion_len must be in [1, {L - 1}] for inputs of length {L}, got {T}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    P = L - T
    logits = _shared_prompt_logits(model, input_ids, attention_mask, T) if share_prompts else None
    if logits is None:
        position_ids = position_ids_from_mask(attention_mask)  # (B, P+T)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        # The logit at position i predicts token i+1, so positions P-1 .. P+T-2 predict the completion.
        predicting = torch.arange(P - 1, L - 1, device=input_ids.device)  # (T,)
        if accepts_logits_to_keep(model):
            logits = model(**kwargs, logits_to_keep=predicting, use_cache=False).logits  # (B, T, V)
        else:
            logits = model(**kwargs, use_cache=False).logits[:, P - 1 : L - 1]  # (B, T, V)
    if temperature != 1.0:
        # Score under the same distribution the sampler drew from (it divides by temperature too).
        logits = logits / temperature
    return logits


def prefill_shared(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, share: bool = True):
    """One forward pass over left-padded prompts, each distinct prompt run once: the logits of the last prompt
    position (B, 1, V) and a KV cache with B rows. Gradients flow when they are on.

    GRPO repeats every prompt G times (DPO twice). The U distinct prompts run once with the cache on, and the
    cache rows are copied to the rows that repeat them (`reorder_cache` with a repeating index: an index_select,
    which autograd differentiates, so the gradient of every copy flows back into its prompt's single pass).
    Naive equivalent: the same forward pass over all B rows (``share=False``, or when no prompt repeats, or when
    the model returns a legacy tuple cache that cannot be reordered).

    Args:
        prompt_ids, prompt_mask: (B, P).
    Returns:
        (last_logits (B, 1, V), cache).
    """
    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    unique, inverse = torch.unique(
        torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True
    )  # (U, 2P), (B,) a prompt is its ids and its padding
    if share and unique.shape[0] < prompt_ids.shape[0]:
        ids, mask = unique.chunk(2, dim=1)  # (U, P) each
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True, **keep_last
        )
        cache = returned_cache(out)
        if hasattr(cache, "reorder_cache"):
            cache.reorder_cache(inverse)  # (U, ...) -> (B, ...) each row gets its prompt's keys and values
            return out.logits[:, -1:][inverse], cache  # (B, 1, V)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        **keep_last,
    )
    return out.logits[:, -1:], returned_cache(out)  # (B, 1, V)


def _shared_prompt_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int
) -> torch.Tensor | None:
    """`_completion_logits` with each distinct prompt run once (`prefill_shared`): (B, T, V), or None when no
    prompt repeats, or the model cannot take a cache.

        prompt pass      (U, P)    -> KV cache, and the logits of the last prompt position (predict y_1)
        completion pass  (B, T-1)  -> logits of y_1 .. y_{T-1} (predict y_2 .. y_T); y_T is never an input

    Same logits and gradients as the plain pass up to float rounding (tests/test_ops.py).
    """
    L, T = input_ids.shape[1], completion_len
    P = L - T
    if not (_forward_accepts(model, "cache") or _forward_accepts(model, "past_key_values")):
        return None
    if model.training and _checkpointing(model):
        return None  # HF turns the cache off under gradient checkpointing in training
    prompts = torch.cat([input_ids[:, :P], attention_mask[:, :P]], dim=1)  # (B, 2P)
    if torch.unique(prompts, dim=0).shape[0] == input_ids.shape[0]:
        return None  # nothing to share
    first_logits, cache = prefill_shared(model, input_ids[:, :P], attention_mask[:, :P])  # (B, 1, V), B rows
    if T == 1:
        return first_logits
    position_ids = position_ids_from_mask(attention_mask)  # (B, P+T)
    rest = model(
        input_ids=input_ids[:, P : L - 1],
        attention_mask=attention_mask[:, : L - 1],
        position_ids=position_ids[:, P : L - 1],
        use_cache=True,
        **cache_kwargs(model, cache),
    ).logits  # (B, T-1, V)
    return torch.cat([first_logits, rest], dim=1)  # (B, T, V)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on (transformers ≥ 5 calls it activation checkpointing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(base, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))


def completion_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    share_prompts: bool = True,
) -> torch.Tensor:
    """Log-probs of the last `completion_len` tokens of each sequence under `model`, one per token.

        log π(y_t | x, y_<t),  t = 1..T

    (`lab.batching.sequence_logprob` sums them into one log π(y|x) per sequence.)

    Naive equivalent, for each row b separately:
        ids = input_ids[b][attention_mask[b].bool()]        # drop padding
        logp = model(ids[None]).logits[0, :-1].log_softmax(-1)
        logp.gather(-1, ids[1:, None])[-T:]                 # the completion's part

    Here all rows go through one forward pass: left padding is handled by the attention mask and by
    position ids that count only real tokens, and only the T positions that predict the completion
    go through the LM head. Rows that share a prompt (GRPO's groups, DPO's chosen and rejected) run
    that prompt once and reuse its KV cache (`share_prompts`, see `_shared_prompt_logits`). Right
    padding inside the completion (after EOS) gets a value too; mask it with the completion mask.

    Args:
        model: a causal LM returning `.logits`.
        input_ids: (B, P+T), prompts left-padded, completions right-padded.
        attention_mask: (B, P+T) of 0/1.
        completion_len: T.
        temperature: logits are divided by it before the softmax.
        chunk_size: rows per chunk in `selective_logprobs`.
        share_prompts: run each distinct prompt once (False: one plain forward pass of every row).
    Returns:
        (B, T) float32.
    """
    logits = _completion_logits(
        model, input_ids, attention_mask, completion_len, temperature, share_prompts
    )  # (B, T, V)
    completion_ids = input_ids[:, -completion_len:]  # (B, T)
    return selective_logprobs(logits, completion_ids, chunk_size or DEFAULT_CHUNK_SIZE)  # (B, T)


def completion_token_logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_len: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_token_logprobs` plus the entropy of the policy at each completion position.

    One forward pass gives both. Naive equivalent: the naive `completion_token_logprobs` loop, plus
    `-(logp.exp() * logp).sum(-1)` at the same positions.

    Returns:
        logprobs (B, T) float32, entropy (B, T) float32 in nats.
    """
    logits = _completion_logits(
        model, input_ids, attention_mask, completion_len, temperature, share_prompts
    )  # (B, T, V)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    completion_ids = input_ids[:, -completion_len:]  # (B, T)
    logprobs = selective_logprobs(logits, completion_ids, chunk_size)  # (B, T)
    with torch.no_grad():  # entropy is a metric: in the graph it would keep a second (B, T, V) float32 copy alive
        entropy = entropy_from_logits(logits.detach(), chunk_size)  # (B, T)
    return logprobs, entropy


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of the entries of `x` where `mask` is 1.

    Naive equivalent: x[mask.bool()].sum()  (dim=None), or (x * mask).sum(dim).

    `torch.where` rather than `x * mask`: a masked entry may hold inf or nan (e.g. a log-prob of
    a padding token), and nan * 0 is nan.
    """
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries of `x` where `mask` is 1.

        mean = Σ mask·x / Σ mask

    Naive equivalent: x[mask.bool()].mean()  (dim=None); with `dim`, the same per slice.
    An all-masked slice gives nan, as the naive mean of an empty tensor does.
    """
    count = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (count.sum() if dim is None else count.sum(dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the entries of `x` where `mask` is 1 (all dimensions together).

        var = Σ mask·(x − mean)² / (n − 1)     (n − 1 → n when unbiased=False)

    Naive equivalent: x[mask.bool()].var(unbiased=unbiased). Like it, the result is nan when
    there are too few entries (n = 0, or n = 1 with unbiased=True).
    """
    keep = mask.bool()
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    # Zero the masked entries *before* squaring: with inf/nan there, the square's backward would
    # multiply a zero gradient by inf and give nan.
    centered = torch.where(keep, x - mean, torch.zeros_like(x))
    sum_sq = (centered**2).sum()
    return sum_sq / (n - 1) if unbiased else sum_sq / n


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalize the masked entries of `x` to zero mean and unit variance.

        whiten(x) = (x − mean) / sqrt(var + eps)            (shift_mean=True)
        whiten(x) = (x − mean) / sqrt(var + eps) + mean     (shift_mean=False: rescale only)

    mean and var (unbiased) are taken over the masked entries only. Masked-out entries of the
    result are set to 0, so a sum that forgets the mask does not pick up garbage.

    Naive equivalent: v = x[m]; (v - v.mean()) / (v.var() + eps).sqrt() (+ v.mean()), written
    back into a zero tensor at m.
    """
    keep = mask.bool()
    x = torch.where(keep, x, torch.zeros_like(x))  # finite everywhere, so the backward stays finite
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html)
#
# Tokens y are sampled from π (the sampling policy), and we want KL(π ‖ π_ref) = E_π[log π − log π_ref].
# With r = π_ref(y) / π(y), i.e. log r = ref_logprobs − logprobs:
#   k1 = −log r            unbiased, can be negative per token, high variance
#   k2 = ½ (log r)²        biased, ≥ 0, low variance; its gradient is the KL gradient at π = π_ref
#   k3 = (r − 1) − log r   unbiased and always ≥ 0 (log is concave, so log r ≤ r − 1)
# --------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y) − log π_ref(y), per token. Unbiased estimate of KL(π ‖ π_ref) for y ~ π."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(y) − log π_ref(y))², per token. Biased, ≥ 0, low variance."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1, per token. Unbiased and ≥ 0."""
    log_ratio = ref_logprobs - logprobs
    # expm1(x) − x equals exp(x) − x − 1 but keeps its precision when x is near 0, where the
    # estimator spends most of its time (π close to π_ref).
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-token KL estimator called `name` ("k1", "k2" or "k3")."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def kl_estimate(name: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate with the estimator called `name`.

    Same as `kl_estimator(name)(logprobs, ref_logprobs)`.
    """
    return kl_estimator(name)(logprobs, ref_logprobs)


# --------------------------------------------------------------------------------------------
# Completion masks
# --------------------------------------------------------------------------------------------


def completion_mask(
    completion_ids: torch.Tensor, eos_token_id: int | Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the real completion tokens: 1 up to and including the first EOS, 0 after it.

    The EOS token is kept in the mask because emitting it is an action the policy took (and is
    rewarded or penalized for); everything after it is padding.

    Naive equivalent, per row:
        k = first index of EOS in the row (or T if none); mask[:k + 1] = 1; truncated = no EOS

    Args:
        completion_ids: (B, T).
        eos_token_id: one id, several ids (any of them ends a completion), or None (nothing ends
            a completion: every row is all ones and truncated).
    Returns:
        mask (B, T) long, truncated (B,) bool (True when the row has no EOS, i.e. it hit the
        length limit).
    """
    if eos_token_id is None:
        is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)  # (B, T)
    else:
        eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
        is_eos = torch.isin(completion_ids, eos_ids)  # (B, T)
    # Number of EOS strictly before each position; the mask keeps positions with none before them.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # (B, T)
    mask = (eos_before == 0).long()  # (B, T)
    truncated = ~is_eos.any(-1)  # (B,)
    return mask, truncated
