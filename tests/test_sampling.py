"""Tests for lab.sampling on a tiny random model and a tiny word-level tokenizer built here."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lab.ops import sequence_logprobs
from lab.sampling import Rollout, format_prompt, generate, top_p_filter

V = 50
PAD, EOS = 0, 1
PROMPTS = ["w1 w2 w3 w4 w5", "w7", "w3 w9 w10", "w20 w21"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: thread start-up costs more than the matmuls, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over V=50 ids: <pad>=0, <eos>=1, <unk>=2, w0..w46 = 3..49."""
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(V - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"eos_token": "<eos>", "unk_token": "<unk>"}
    if with_pad:
        special["pad_token"] = "<pad>"
    else:  # same ids, but <pad> is only some special token, not the tokenizer's pad token
        special["additional_special_tokens"] = ["<pad>"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
        initializer_range=0.2,  # peakier than the default 0.02: no near-ties between top tokens
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2() -> GPT2LMHeadModel:
    """Absolute position embeddings: a wrong position id under left padding changes its output."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama():
    return make_llama()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, llama):
    return llama if request.param == "llama" else make_gpt2()


# --------------------------------------------------------------------------------------------
# Greedy decoding vs Hugging Face generate
# --------------------------------------------------------------------------------------------


def hf_greedy(model, tokenizer, prompts, max_new_tokens):
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    out = model.generate(
        input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], do_sample=False,
        max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=EOS,
    )
    return out[:, encoded["input_ids"].shape[1] :]  # (B, T)


def test_greedy_matches_hf_generate(model, tokenizer):
    ours = generate(model, tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    theirs = hf_greedy(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert torch.equal(ours.completion_ids, theirs)
    # Not vacuous: completions differ between rows, and at least one row ends early with EOS.
    assert len({tuple(row) for row in ours.completion_ids.tolist()}) == len(PROMPTS)
    assert not ours.truncated.all()


def test_left_padding_does_not_change_greedy_results(model, tokenizer):
    batch = generate(model, tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer, [prompt], max_new_tokens=8, greedy=True)
        T = alone.completion_ids.shape[1]
        assert torch.equal(batch.completion_ids[b, :T], alone.completion_ids[0])
        assert batch.completion_mask[b, T:].sum() == 0  # anything longer in the batch is padding
        assert batch.completions[b] == alone.completions[0]


def test_batch_size_splits_and_joins(llama, tokenizer):
    whole = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    split = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, greedy=True, batch_size=3)
    for name in ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"]:
        assert torch.equal(getattr(whole, name), getattr(split, name)), name
    assert whole.completions == split.completions and split.prompts == PROMPTS


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(llama, tokenizer):
    def sample(seed):
        return generate(llama, tokenizer, PROMPTS * 4, max_new_tokens=6,
                        generator=torch.Generator().manual_seed(seed)).completion_ids

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_tiny_top_p_and_tiny_temperature_are_greedy(llama, tokenizer):
    greedy = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, greedy=True).completion_ids
    g = torch.Generator().manual_seed(0)
    tiny_p = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, top_p=1e-6, generator=g).completion_ids
    cold = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, temperature=1e-4, generator=g).completion_ids
    assert torch.equal(tiny_p, greedy)
    assert torch.equal(cold, greedy)
    # At temperature 1 the same prompts sample something else.
    hot = generate(llama, tokenizer, PROMPTS * 2, max_new_tokens=8, generator=g).completion_ids
    assert not all(torch.equal(hot[b, : greedy.shape[1]], greedy[b % 4]) for b in range(8))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count ≥ 5 (the rest pooled into one cell)."""
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_first_token_frequencies_match_softmax(llama, tokenizer, top_p):
    """5,000 one-token samples for one prompt vs softmax of its next-token logits (nucleus-renormalized).

    With df degrees of freedom the statistic has mean df and sd sqrt(2 df); we allow mean + 6 sd.
    The same counts scored against the temperature-2 distribution must be far outside that bound.
    """
    N = 5_000
    prompt = "w1 w2 w3"
    rollout = generate(llama, tokenizer, [prompt] * N, max_new_tokens=1, top_p=top_p,
                       generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=V).double()  # (V,)
    with torch.no_grad():
        logits = llama(**tokenizer([prompt], return_tensors="pt", return_token_type_ids=False)).logits[0, -1]
    probs = top_p_filter(logits[None], top_p)[0].double().softmax(-1)  # (V,)
    stat, df = chi_square(counts, probs)
    assert df >= 10
    assert stat < df + 6 * math.sqrt(2 * df)
    wrong = top_p_filter((logits / 2)[None], top_p)[0].double().softmax(-1)
    wrong_stat, wrong_df = chi_square(counts, wrong)
    assert wrong_stat > wrong_df + 20 * math.sqrt(2 * wrong_df)
    if top_p < 1:
        assert counts[probs == 0].sum() == 0  # nothing outside the nucleus


# --------------------------------------------------------------------------------------------
# Masks, truncation, decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [1, 3, 12])
def test_completion_mask_and_truncated_are_consistent(llama, tokenizer, max_new_tokens):
    r = generate(llama, tokenizer, PROMPTS * 3, max_new_tokens=max_new_tokens,
                 generator=torch.Generator().manual_seed(3))
    B, T = r.completion_ids.shape
    assert B == 12 and 1 <= T <= max_new_tokens
    for b in range(B):
        ids, mask = r.completion_ids[b].tolist(), r.completion_mask[b].tolist()
        if EOS in ids:
            end = ids.index(EOS)  # first EOS
            assert not r.truncated[b]
            assert mask == [1] * (end + 1) + [0] * (T - end - 1)
            assert all(t == PAD for t in ids[end + 1 :])  # padding after EOS
            assert r.completions[b] == tokenizer.decode(ids[:end], skip_special_tokens=True)
        else:
            assert r.truncated[b] and mask == [1] * T and T == max_new_tokens
            assert r.completions[b] == tokenizer.decode(ids, skip_special_tokens=True)
    if T < max_new_tokens:
        # The loop stopped early, so every row has ended, and the last one ended in the last column.
        assert not r.truncated.any() and r.completion_mask[:, -1].any()


def test_early_stop_when_all_rows_end(tokenizer):
    """A model pushed to always emit EOS: every row stops after one token, so T = 1."""
    model = make_llama()

    def favor_eos(module, inputs, logits):
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(EOS), V)

    model.lm_head.register_forward_hook(favor_eos)
    for kwargs in [dict(greedy=True), dict(generator=torch.Generator().manual_seed(0))]:
        r = generate(model, tokenizer, PROMPTS, max_new_tokens=10, **kwargs)
        assert r.completion_ids.tolist() == [[EOS]] * len(PROMPTS)
        assert r.completion_mask.tolist() == [[1]] * len(PROMPTS)
        assert not r.truncated.any() and r.completions == [""] * len(PROMPTS)


def test_tokenizer_without_pad_token_pads_with_eos(llama):
    tokenizer = make_tokenizer(with_pad=False)
    assert tokenizer.pad_token_id is None
    r = generate(llama, tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    with_pad = generate(llama, make_tokenizer(), PROMPTS, max_new_tokens=8, greedy=True)
    # Same tokens up to each row's EOS; padding is EOS instead of <pad>, masks are identical.
    assert torch.equal(r.completion_mask, with_pad.completion_mask)
    assert torch.equal(r.prompt_mask, with_pad.prompt_mask)
    assert torch.equal(r.truncated, with_pad.truncated)
    real = r.completion_mask.bool()
    assert torch.equal(r.completion_ids[real], with_pad.completion_ids[real])
    assert (r.completion_ids[~real] == EOS).all() and (r.prompt_ids[r.prompt_mask == 0] == EOS).all()
    assert r.completions == with_pad.completions


def test_prompts_are_left_padded_with_tokenizer_masks(llama, tokenizer):
    tokenizer.padding_side = "right"  # generate left-pads whatever the tokenizer says
    r = generate(llama, tokenizer, PROMPTS, max_new_tokens=2, greedy=True)
    assert r.prompt_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert r.prompt_ids[1].tolist() == [PAD] * 4 + tokenizer("w7")["input_ids"]
    tokenizer.padding_side = "left"


def test_generate_restores_training_mode(tokenizer):
    model = make_llama().train()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, greedy=True)
    assert model.training
    model.eval()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, greedy=True)
    assert not model.training


def test_generate_rejects_bad_arguments(llama, tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(llama, tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(llama, tokenizer, PROMPTS, max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(llama, tokenizer, PROMPTS, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="no tokens"):
        generate(llama, tokenizer, ["w1", ""], max_new_tokens=2)
    with pytest.raises(TypeError):
        generate(llama, tokenizer, "w1 w2", max_new_tokens=2)


# --------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------


def test_rollout_layout_select_and_to(llama, tokenizer):
    r = generate(llama, tokenizer, PROMPTS, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    assert len(r) == 4
    assert torch.equal(r.input_ids, torch.cat([r.prompt_ids, r.completion_ids], 1))
    assert torch.equal(r.attention_mask, torch.cat([r.prompt_mask, r.completion_mask], 1))
    assert r.input_ids.shape == r.attention_mask.shape == (4, P + T)

    sub = r.select([2, 0])
    assert len(sub) == 2 and sub.prompts == [PROMPTS[2], PROMPTS[0]]
    assert sub.completions == [r.completions[2], r.completions[0]]
    assert torch.equal(sub.completion_ids, r.completion_ids[[2, 0]])
    assert torch.equal(sub.truncated, r.truncated[[2, 0]])
    assert r.select(slice(1, 3)).prompts == PROMPTS[1:3]
    assert r.select(torch.tensor([True, False, False, True])).prompts == [PROMPTS[0], PROMPTS[3]]
    assert r.select(1).prompts == [PROMPTS[1]] and r.select(1).completion_ids.shape == (1, T)

    moved = r.to("cpu")
    assert isinstance(moved, Rollout) and torch.equal(moved.input_ids, r.input_ids)


def test_sampled_tokens_are_scored_consistently(llama, tokenizer):
    """The rollout layout feeds straight into sequence_logprobs; greedy tokens are each step's argmax."""
    r = generate(llama, tokenizer, PROMPTS, max_new_tokens=6, greedy=True)
    T = r.completion_ids.shape[1]
    with torch.no_grad():
        logprobs = sequence_logprobs(llama, r.input_ids, r.attention_mask, T)  # (B, T)
        P = r.prompt_ids.shape[1]
        logits = llama(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, P - 1 : -1]
    best = logits.float().log_softmax(-1).max(-1).values  # (B, T)
    real = r.completion_mask.bool()
    torch.testing.assert_close(logprobs[real], best[real], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# top_p_filter
# --------------------------------------------------------------------------------------------


def naive_top_p(logits, top_p):
    """Per row: walk down the sorted probabilities, keeping tokens until their sum reaches top_p."""
    out = torch.full_like(logits, float("-inf"))
    for b in range(logits.shape[0]):
        probs = logits[b].softmax(-1)
        total = 0.0
        for v in sorted(range(logits.shape[1]), key=lambda v: -probs[v].item()):
            out[b, v] = logits[b, v]
            total += probs[v].item()
            if total >= top_p:
                break
    return out


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.75, 0.95, 1.0])
def test_top_p_filter_matches_naive(top_p):
    logits = 2 * torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    got = top_p_filter(logits, top_p)
    torch.testing.assert_close(got, naive_top_p(logits, top_p))
    assert torch.isfinite(got).sum(-1).min() >= 1


def test_top_p_filter_hand_case():
    """probs [0.5, 0.3, 0.2]: top_p 0.5 keeps {0}; 0.6 keeps {0, 1}; 0.85 keeps all three."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.6)).tolist() == [[True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.85)).tolist() == [[True, True, True]]


# --------------------------------------------------------------------------------------------
# format_prompt
# --------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_format_prompt():
    tokenizer = make_tokenizer()
    assert format_prompt(tokenizer, "w1 w2") == "w1 w2"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w1 w2"}]
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt(tokenizer, messages)
    tokenizer.chat_template = CHAT_TEMPLATE
    assert format_prompt(tokenizer, messages) == "<system> be brief\n<user> w1 w2\n<assistant>"
    assert format_prompt(tokenizer, "w1 w2") == "w1 w2"  # strings never go through the template
    with pytest.raises(TypeError):
        format_prompt(tokenizer, [{"text": "no role"}])


def test_generate_applies_the_chat_template_to_message_prompts():
    """A conversational prompt samples exactly like its chat-template string."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lab.sampling import generate

    words = ["<pad>", "</s>", "<unk>", "user", ":", "hi", "there", "assistant"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                         eos_token_id=1))
    chat = generate(model, tok, [[{"role": "user", "content": "hi there"}]], 4, greedy=True)
    text = generate(model, tok, ["user : hi there assistant : "], 4, greedy=True)
    assert chat.prompts == text.prompts and torch.equal(chat.completion_ids, text.completion_ids)
