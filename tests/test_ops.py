"""Tests for lab.ops: each helper against its naive equivalent, plus hand-computed values."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lab.ops import (
    KL_ESTIMATORS,
    completion_mask,
    completion_token_logprobs,
    completion_token_logprobs_and_entropy,
    entropy_from_logits,
    kl_estimate,
    kl_estimator,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    selective_logprobs,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than the matmuls, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# selective_logprobs / entropy_from_logits
# --------------------------------------------------------------------------------------------


def naive_logprobs(logits, ids):
    return logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_selective_logprobs_matches_naive_gather(dtype, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, 33, generator=g)).to(dtype)  # (B, T, V)
    ids = torch.randint(0, 33, (4, 5), generator=g)  # (B, T)
    got = selective_logprobs(logits, ids, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (4, 5)
    torch.testing.assert_close(got, naive_logprobs(logits, ids), atol=1e-5, rtol=0)


def test_selective_logprobs_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 11, generator=g)
    ids = torch.randint(0, 11, (3, 4), generator=g)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    selective_logprobs(a, ids, chunk_size=5).sum().backward()
    naive_logprobs(b, ids).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_selective_logprobs_hand_value():
    """Uniform logits over V=4 -> log(1/4) for any token; logits [0, ln 3] -> p = [1/4, 3/4]."""
    assert selective_logprobs(torch.zeros(1, 1, 4), torch.tensor([[2]])).item() == pytest.approx(math.log(0.25))
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert selective_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))


def test_selective_logprobs_shape_mismatch():
    with pytest.raises(ValueError, match="must agree"):
        selective_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_naive(dtype):
    g = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(3, 6, 17, generator=g)).to(dtype)
    logp = logits.float().log_softmax(-1)
    naive = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), naive, atol=1e-5, rtol=0)
    # Uniform over V has entropy log V.
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)


# --------------------------------------------------------------------------------------------
# completion_token_logprobs on a tiny Llama, vs one unpadded forward pass per sequence
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        initializer_range=0.2,  # peakier than the default 0.02, so log-probs differ visibly
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_gpt2():
    """Absolute position embeddings: unlike RoPE (which only sees relative positions), a wrong
    position id changes the output, so this model checks that left padding does not shift them."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


@pytest.fixture(scope="module")
def padded_batch():
    """Prompts of lengths 5, 2, 4 left-padded to P=5; completions of T=4 with right padding.

    Row 1's completion has 2 real tokens, row 2's has 3, row 0's all 4.
    """
    g = torch.Generator().manual_seed(3)
    P, T = 5, 4
    prompt_lens, completion_lens = [5, 2, 4], [4, 2, 3]
    input_ids = torch.zeros(3, P + T, dtype=torch.long)
    attention_mask = torch.zeros(3, P + T, dtype=torch.long)
    for b, (p, t) in enumerate(zip(prompt_lens, completion_lens)):
        input_ids[b, P - p : P + t] = torch.randint(2, 50, (p + t,), generator=g)
        attention_mask[b, P - p : P + t] = 1
    return input_ids, attention_mask, T


def naive_sequence_logprobs(model, input_ids, attention_mask, T, temperature=1.0):
    """Per row: drop padding, forward alone, log_softmax, gather the completion's tokens.

    Returns a list of (n_b,) log-probs (the real completion tokens of row b) and entropies.
    """
    P = input_ids.shape[1] - T
    logprobs, entropies = [], []
    for b in range(input_ids.shape[0]):
        n_completion = int(attention_mask[b, P:].sum())
        ids = input_ids[b][attention_mask[b].bool()]  # (p + n,) unpadded
        with torch.no_grad():
            logp = (model(ids[None]).logits[0, :-1] / temperature).log_softmax(-1)  # (p + n - 1, V)
        logp = logp[-n_completion:]  # positions that predict the completion
        logprobs.append(logp.gather(-1, ids[-n_completion:, None]).squeeze(-1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return logprobs, entropies


def test_position_ids_from_mask_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_matches_unpadded_loop(tiny_model, padded_batch, temperature):
    input_ids, attention_mask, T = padded_batch
    P = input_ids.shape[1] - T
    with torch.no_grad():
        got = completion_token_logprobs(tiny_model, input_ids, attention_mask, T, temperature=temperature, chunk_size=3)
    assert got.shape == (3, T) and got.dtype == torch.float32
    expected, _ = naive_sequence_logprobs(tiny_model, input_ids, attention_mask, T, temperature)
    for b in range(3):
        real = attention_mask[b, P:].bool()
        torch.testing.assert_close(got[b][real], expected[b], atol=1e-4, rtol=0)
    # Guard against a vacuous pass: the log-probs are far from uniform.
    assert (got[attention_mask[:, P:].bool()] - math.log(1 / 50)).abs().max() > 0.5


def test_completion_token_logprobs_and_entropy_matches_unpadded_loop(tiny_llama, padded_batch):
    input_ids, attention_mask, T = padded_batch
    P = input_ids.shape[1] - T
    with torch.no_grad():
        logprobs, entropy = completion_token_logprobs_and_entropy(tiny_llama, input_ids, attention_mask, T)
        plain = completion_token_logprobs(tiny_llama, input_ids, attention_mask, T)
    torch.testing.assert_close(logprobs, plain)
    expected_logprobs, expected_entropy = naive_sequence_logprobs(tiny_llama, input_ids, attention_mask, T)
    for b in range(3):
        real = attention_mask[b, P:].bool()
        torch.testing.assert_close(logprobs[b][real], expected_logprobs[b], atol=1e-4, rtol=0)
        torch.testing.assert_close(entropy[b][real], expected_entropy[b], atol=1e-4, rtol=0)


def test_sequence_logprobs_without_logits_to_keep(tiny_llama, padded_batch):
    """A model whose forward has no `logits_to_keep` takes the slice-the-logits path."""

    class PlainForward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    input_ids, attention_mask, T = padded_batch
    with torch.no_grad():
        fast = completion_token_logprobs(tiny_llama, input_ids, attention_mask, T)
        plain = completion_token_logprobs(PlainForward(tiny_llama), input_ids, attention_mask, T)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


def test_sequence_logprobs_gradient_flows(tiny_llama, padded_batch):
    input_ids, attention_mask, T = padded_batch
    tiny_llama.zero_grad()
    completion_token_logprobs(tiny_llama, input_ids, attention_mask, T).sum().backward()
    assert tiny_llama.lm_head.weight.grad.abs().sum() > 0
    tiny_llama.zero_grad()


def test_sequence_logprobs_rejects_bad_lengths(tiny_llama, padded_batch):
    input_ids, attention_mask, _ = padded_batch
    with pytest.raises(ValueError, match="completion_len"):
        completion_token_logprobs(tiny_llama, input_ids, attention_mask, input_ids.shape[1])


# --------------------------------------------------------------------------------------------
# Masked statistics vs boolean indexing
# --------------------------------------------------------------------------------------------


@pytest.fixture
def x_and_mask():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 7, generator=g) * 3 + 1
    mask = (torch.rand(4, 7, generator=g) > 0.4).long()
    mask[:, 0] = 1  # every row has at least one entry
    mask[0, :3] = 1  # ... and row 0 at least three
    return x, mask


def test_masked_sum_and_mean_match_boolean_indexing(x_and_mask):
    x, mask = x_and_mask
    m = mask.bool()
    torch.testing.assert_close(masked_sum(x, mask), x[m].sum())
    torch.testing.assert_close(masked_mean(x, mask), x[m].mean())
    per_row = torch.stack([x[b][m[b]].mean() for b in range(4)])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), per_row)
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.stack([x[b][m[b]].sum() for b in range(4)]))


def test_masked_mean_hand_value():
    """[1, 2, 100] with mask [1, 1, 0] -> (1 + 2) / 2 = 1.5."""
    assert masked_mean(torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1, 1, 0])).item() == 1.5


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_boolean_indexing(x_and_mask, unbiased):
    x, mask = x_and_mask
    torch.testing.assert_close(masked_var(x, mask, unbiased=unbiased), x[mask.bool()].var(unbiased=unbiased))


def test_masked_var_hand_value():
    """[1, 3, 50] with mask [1, 1, 0]: mean 2, squared deviations 1 + 1 = 2 -> unbiased 2/1, biased 2/2."""
    x, mask = torch.tensor([1.0, 3.0, 50.0]), torch.tensor([1, 1, 0])
    assert masked_var(x, mask).item() == 2.0
    assert masked_var(x, mask, unbiased=False).item() == 1.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_boolean_indexing(x_and_mask, shift_mean):
    x, mask = x_and_mask
    m = mask.bool()
    v = x[m]
    naive = torch.zeros_like(x)
    naive[m] = (v - v.mean()) / (v.var() + 1e-8).sqrt() + (0 if shift_mean else v.mean())
    got = masked_whiten(x, mask, shift_mean=shift_mean)
    torch.testing.assert_close(got, naive)
    if shift_mean:
        assert abs(got[m].mean().item()) < 1e-5 and got[m].std().item() == pytest.approx(1.0, abs=1e-5)


def test_masked_ops_ignore_inf_and_nan_under_the_mask():
    """Padding positions may hold -inf log-probs; they must not leak into values or gradients."""
    x = torch.tensor([1.0, 2.0, 4.0, float("-inf"), float("nan")], requires_grad=True)
    mask = torch.tensor([1, 1, 1, 0, 0])
    clean = torch.tensor([1.0, 2.0, 4.0])
    assert masked_mean(x, mask).item() == pytest.approx(clean.mean().item())
    assert masked_var(x, mask).item() == pytest.approx(clean.var().item())
    whitened = masked_whiten(x, mask)
    assert torch.isfinite(whitened).all()
    (masked_mean(x, mask) + masked_var(x, mask) + (whitened * torch.arange(5.0)).sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad[3:].abs().sum() == 0


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    """logp = log 0.5, logref = log 0.25: d = logp - logref = ln 2.

    k1 = ln 2 ≈ 0.6931;  k2 = ½ (ln 2)² ≈ 0.2402;  k3 = r − 1 − ln r with r = 0.25/0.5 = ½:
    ½ − 1 + ln 2 ≈ 0.1931.
    """
    logp, logref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert kl_k1(logp, logref).item() == pytest.approx(ln2)
    assert kl_k2(logp, logref).item() == pytest.approx(0.5 * ln2**2)
    assert kl_k3(logp, logref).item() == pytest.approx(0.5 - 1 + ln2)
    # The opposite direction: r = 2 -> k3 = 2 - 1 - ln 2 ≈ 0.3069; k1 is negative.
    assert kl_k3(logref, logp).item() == pytest.approx(1 - ln2)
    assert kl_k1(logref, logp).item() == pytest.approx(-ln2)


def test_kl_estimators_zero_when_equal():
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    for name in KL_ESTIMATORS:
        assert torch.equal(kl_estimate(name, logp, logp.clone()), torch.zeros_like(logp))


def test_kl_k3_is_nonnegative():
    g = torch.Generator().manual_seed(6)
    logp, logref = 5 * torch.randn(10_000, generator=g), 5 * torch.randn(10_000, generator=g)
    assert (kl_k3(logp, logref) >= 0).all()
    assert (kl_k2(logp, logref) >= 0).all()
    assert (kl_k1(logp, logref) < 0).any()  # k1 is only non-negative on average


def test_k1_and_k3_are_unbiased_monte_carlo():
    """Tokens drawn from p over V=6: the sample means of k1 and k3 approach the exact KL(p‖q)."""
    g = torch.Generator().manual_seed(7)
    logp_all = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0]).log_softmax(-1)  # (V,)
    logq_all = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0, 0.0]).log_softmax(-1)  # (V,)
    exact = (logp_all.exp() * (logp_all - logq_all)).sum().item()
    samples = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=g)  # (N,) ~ p
    logp, logq = logp_all[samples], logq_all[samples]
    for estimator in (kl_k1, kl_k3):
        values = estimator(logp, logq).double()
        stderr = values.std().item() / math.sqrt(values.numel())
        assert abs(values.mean().item() - exact) < 4 * stderr + 1e-4, estimator.__name__
    # k2 is biased: its mean is visibly off here, so the test above is not vacuous.
    assert abs(kl_k2(logp, logq).mean().item() - exact) > 0.02


def test_kl_estimator_lookup():
    assert kl_estimator("k3") is kl_k3
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimator("k4")


# --------------------------------------------------------------------------------------------
# completion_mask
# --------------------------------------------------------------------------------------------


def test_completion_mask_hand_cases():
    """EOS = 9. Row 0: EOS first. Row 1: EOS in the middle, then pad and a second EOS. Row 2: no EOS."""
    ids = torch.tensor(
        [
            [9, 0, 0, 0],
            [5, 6, 9, 9],
            [5, 6, 7, 8],
        ]
    )
    mask, truncated = completion_mask(ids, eos_token_id=9)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_completion_mask_several_eos_ids_and_none():
    ids = torch.tensor([[5, 3, 9, 4], [2, 9, 3, 4]])
    mask, truncated = completion_mask(ids, eos_token_id=[3, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False]
    mask, truncated = completion_mask(ids, eos_token_id=None)
    assert mask.tolist() == [[1] * 4] * 2 and truncated.tolist() == [True, True]


# --------------------------------------------------------------------------------------------
# Shared prompts: each distinct prompt runs once, its KV cache is copied to its rows
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_batch(padded_batch):
    """GRPO's layout: each of the 3 prompts of `padded_batch` G=3 times, with different completions."""
    input_ids, attention_mask, T = padded_batch
    G = 3
    input_ids, attention_mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
    g = torch.Generator().manual_seed(5)
    P = input_ids.shape[1] - T
    input_ids[:, P:] = torch.randint(2, 50, (input_ids.shape[0], T), generator=g)
    completion_lens = torch.tensor([4, 2, 3, 1, 4, 3, 2, 2, 4])
    attention_mask[:, P:] = (torch.arange(T)[None] < completion_lens[:, None]).long()
    return input_ids, attention_mask, T


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_logprobs_match_plain(tiny_model, grouped_batch, temperature):
    input_ids, attention_mask, T = grouped_batch
    with torch.no_grad():
        shared, shared_entropy = completion_token_logprobs_and_entropy(
            tiny_model, input_ids, attention_mask, T, temperature
        )
        plain, plain_entropy = completion_token_logprobs_and_entropy(
            tiny_model, input_ids, attention_mask, T, temperature, share_prompts=False
        )
    mask = attention_mask[:, -T:].bool()
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_entropy[mask], plain_entropy[mask], atol=1e-5, rtol=1e-5)


def test_shared_prompt_runs_each_prompt_once(tiny_llama, grouped_batch):
    input_ids, attention_mask, T = grouped_batch
    rows = []
    hook = tiny_llama.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        with torch.no_grad():
            completion_token_logprobs(tiny_llama, input_ids, attention_mask, T)
    finally:
        hook.remove()
    P = input_ids.shape[1] - T
    assert rows == [torch.Size([3, P]), torch.Size([9, T - 1])]


def test_shared_prompt_gradients_match_plain(grouped_batch):
    """The gradient of every copy of a prompt's cache flows back into its one forward pass: same parameter
    gradients as the plain pass, for a loss that weighs every token differently."""
    input_ids, attention_mask, T = grouped_batch
    grads = {}
    for share in [True, False]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=50,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                initializer_range=0.2,
            )
        )
        logprobs = completion_token_logprobs(model, input_ids, attention_mask, T, share_prompts=share)  # (B, T)
        weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
        (logprobs * weights * attention_mask[:, -T:]).sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_single_token_completions(tiny_llama, grouped_batch):
    input_ids, attention_mask, T = grouped_batch
    L = input_ids.shape[1] - T + 1
    ids, mask = input_ids[:, :L], attention_mask[:, :L].clone()
    mask[:, -1] = 1
    with torch.no_grad():
        shared = completion_token_logprobs(tiny_llama, ids, mask, 1)
        plain = completion_token_logprobs(tiny_llama, ids, mask, 1, share_prompts=False)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pair_sequence_logprob_matches_naive(arch, tiny_llama, tiny_gpt2):
    """lab.batching.sequence_logprob (relaid as prompt | completion, prompts shared by chosen and rejected)
    equals the plain right-padded token_logprobs sum."""
    from lab.batching import (
        PairBatch,
        prompt_completion_layout,
        sequence_logprob,
        token_logprobs,
    )

    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, 50, (n,), generator=g).tolist() for n in [3, 5, 1]]
    completions = [torch.randint(2, 50, (n,), generator=g).tolist() for n in [2, 4, 3, 1, 0, 2]]
    rows = [(prompts[i % 3], completions[i]) for i in range(6)]  # chosen 0..2, rejected 3..5
    L = max(len(p) + len(c) for p, c in rows)
    ids, att, comp = (torch.zeros(6, L, dtype=torch.long) for _ in range(3))
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        att[i, : len(p) + len(c)] = 1
        comp[i, len(p) : len(p) + len(c)] = 1
    batch = PairBatch(ids, att, comp)
    _, _, completion_mask = prompt_completion_layout(batch)
    assert completion_mask.sum(-1).tolist() == [len(c) for _, c in rows]
    with torch.no_grad():
        total, count = sequence_logprob(model, batch)
        logprobs, mask = token_logprobs(model, batch)
    torch.testing.assert_close(total, (logprobs * mask).sum(-1), atol=1e-5, rtol=1e-5)
    assert count.tolist() == [len(c) for _, c in rows]
    average, _ = sequence_logprob(model, batch, average=True)
    torch.testing.assert_close(average, total / count.clamp(min=1))
