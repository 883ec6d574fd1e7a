"""Tests for lab.sampling on a tiny random model and a tiny word-level tokenizer built here."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lab.ops import completion_token_logprobs
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
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        initializer_range=0.2,  # peakier than the default 0.02: no near-ties between top tokens
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2() -> GPT2LMHeadModel:
    """Absolute position embeddings: a wrong position id under left padding changes its output."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        initializer_range=0.2,
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
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=EOS,
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
        return generate(
            llama, tokenizer, PROMPTS * 4, max_new_tokens=6, generator=torch.Generator().manual_seed(seed)
        ).completion_ids

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
    rollout = generate(
        llama, tokenizer, [prompt] * N, max_new_tokens=1, top_p=top_p, generator=torch.Generator().manual_seed(0)
    )
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
    r = generate(
        llama, tokenizer, PROMPTS * 3, max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(3)
    )
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
    """The rollout layout feeds straight into completion_token_logprobs; greedy tokens are each step's argmax."""
    r = generate(llama, tokenizer, PROMPTS, max_new_tokens=6, greedy=True)
    T = r.completion_ids.shape[1]
    with torch.no_grad():
        logprobs = completion_token_logprobs(llama, r.input_ids, r.attention_mask, T)  # (B, T)
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
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    chat = generate(model, tok, [[{"role": "user", "content": "hi there"}]], 4, greedy=True)
    text = generate(model, tok, ["user : hi there assistant : "], 4, greedy=True)
    assert chat.prompts == text.prompts and torch.equal(chat.completion_ids, text.completion_ids)


# --------------------------------------------------------------------------------------------
# Real-model special tokens, on stand-ins: Llama 3 (BOS in the template and from the tokenizer,
# several end tokens), ChatML/Qwen (no BOS, eos = <|im_end|>), GPT-2 (no template)
# --------------------------------------------------------------------------------------------

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|> "
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|> {% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
WORDS = ["user", "assistant", "system"] + [f"w{i}" for i in range(40)]


def make_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 3's mechanics: the post-processor adds <|begin_of_text|> and the template writes it too;
    eos <|end_of_text|>, turns end with <|eot_id|>, no pad token."""
    from tokenizers import processors

    vocab = {w: i for i, w in enumerate(LLAMA3_SPECIALS + ["<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="<unk>",
        additional_special_tokens=LLAMA3_SPECIALS[2:],
    )
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def make_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2-Instruct's mechanics: no BOS, eos = <|im_end|>, pad <|endoftext|>."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["<unk>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def make_llama3_model(eot_bias: float = 0.0) -> LlamaForCausalLM:
    """A random Llama whose generation config stops on <|end_of_text|> and <|eot_id|>, as Meta-Llama-3-Instruct's
    does; `eot_bias` pushes <|eot_id|> up in every next-token distribution."""
    torch.manual_seed(0)
    vocab_size = len(LLAMA3_SPECIALS) + 1 + len(WORDS)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            bos_token_id=0,
            eos_token_id=1,
            initializer_range=0.2,
        )
    ).eval()
    model.generation_config.eos_token_id = [1, 2]  # <|end_of_text|>, <|eot_id|>
    if eot_bias:
        model.lm_head.register_forward_hook(
            lambda module, inputs, logits: logits + eot_bias * torch.nn.functional.one_hot(torch.tensor(2), vocab_size)
        )
    return model


def test_llama3_chat_prompt_has_one_bos():
    """The template writes <|begin_of_text|> and the tokenizer would add another (BOS BOS ...)."""
    from lab.batching import encode_pairs
    from lab.sampling import encode_prompt

    tok = make_llama3_tokenizer()
    chat = [{"role": "user", "content": "w1 w2"}]
    text = format_prompt(tok, chat)
    assert tok(text)["input_ids"][:2] == [0, 0]  # the trap
    assert encode_prompt(tok, text)[:2] == [0, tok.convert_tokens_to_ids("<|start_header_id|>")]
    assert encode_prompt(tok, "w1 w2") == tok("w1 w2")["input_ids"]  # plain text still gets its BOS
    r = generate(make_llama3_model(), tok, [chat, "w1 w2 w3"], max_new_tokens=2, greedy=True)
    first = r.prompt_ids[r.prompt_mask.bool()].tolist()
    assert (torch.tensor(first) == 0).sum() == 2  # one BOS per prompt
    for row, mask in zip(r.prompt_ids, r.prompt_mask):
        real = row[mask.bool()].tolist()
        assert real[0] == 0 and real[1] != 0
    batch = encode_pairs(tok, [chat], ["w3"])
    assert batch.input_ids[0, :2].tolist() == [0, tok.convert_tokens_to_ids("<|start_header_id|>")]


def test_generation_stops_on_generation_config_end_tokens():
    """Meta-Llama-3-Instruct: eos is <|end_of_text|>, but HF generate also stops on <|eot_id|> (its
    generation_config). A model that always says <|eot_id|> must end after one token, as HF generate does."""
    tok = make_llama3_tokenizer()
    model = make_llama3_model(eot_bias=100.0)
    prompts = ["w1 w2", "w3"]
    r = generate(model, tok, prompts, max_new_tokens=6, greedy=True)
    assert r.completion_ids.tolist() == [[2], [2]] and r.completion_mask.tolist() == [[1], [1]]
    assert not r.truncated.any() and r.completions == ["", ""]
    encoded = tok(prompts[:1], return_tensors="pt", return_token_type_ids=False)
    hf = model.generate(**encoded, do_sample=False, max_new_tokens=6, pad_token_id=1)
    assert hf[0, encoded["input_ids"].shape[1] :].tolist() == [2]


def test_decode_strips_whichever_end_token_ended_the_row():
    """A moderate push to <|eot_id|>: rows end at different steps; the text never holds the end token."""
    tok = make_llama3_tokenizer()
    model = make_llama3_model(eot_bias=2.5)
    r = generate(
        model,
        tok,
        [f"w{i} w{i + 1}" for i in range(0, 32, 2)],
        max_new_tokens=8,
        generator=torch.Generator().manual_seed(0),
    )
    ended = ~r.truncated
    assert ended.any()
    for b in range(len(r)):
        n = int(r.completion_mask[b].sum())
        ids = r.completion_ids[b, :n].tolist()
        if ended[b]:
            assert ids[-1] in (1, 2) and not {1, 2} & set(ids[:-1])
            assert r.completions[b] == tok.decode(ids[:-1], skip_special_tokens=True)
        assert "<|" not in r.completions[b]


def test_end_and_turn_end_tokens_of_each_family():
    from lab.batching import completion_end_token_id, encode_pairs
    from lab.sampling import end_token_ids, turn_end_token_id

    llama3, chatml, plain = make_llama3_tokenizer(), make_chatml_tokenizer(), make_tokenizer()
    assert turn_end_token_id(llama3) == llama3.convert_tokens_to_ids("<|eot_id|>") == 2
    assert turn_end_token_id(chatml) == chatml.eos_token_id == chatml.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_token_id(plain) == EOS  # no template (GPT-2)
    plain.chat_template = CHAT_TEMPLATE  # a template that closes turns with plain text
    assert turn_end_token_id(plain) == EOS
    assert end_token_ids(llama3) == [1, 2]  # tokenizer eos + the template's turn end
    assert end_token_ids(llama3, make_llama3_model()) == [1, 2]
    assert end_token_ids(chatml) == [chatml.eos_token_id]
    chat = [{"role": "user", "content": "w1"}]
    assert completion_end_token_id(llama3, chat) == 2 and completion_end_token_id(llama3, "w1") == 1
    batch = encode_pairs(llama3, [chat, "w1"], ["w2 w3", "w2 w3"])
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist()[-1] == 2  # <|eot_id|>
    assert batch.input_ids[1][batch.attention_mask[1].bool()].tolist()[-1] == 1  # <|end_of_text|>
    qwen = encode_pairs(chatml, [chat], ["w2"])
    ids = qwen.input_ids[0].tolist()
    assert ids[0] == chatml.convert_tokens_to_ids("<|im_start|>")  # no BOS
    assert ids[-1] == chatml.eos_token_id


# --------------------------------------------------------------------------------------------
# Fast paths: LoRA merged while sampling, one prefill per distinct prompt
# --------------------------------------------------------------------------------------------


def make_lora_llama():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )  # B ≠ 0: the adapter matters
    return model


def test_merged_adapters_same_outputs_and_restored_weights(tokenizer):
    from lab.sampling import merged_adapters

    model = make_lora_llama().eval()
    ids = tokenizer(PROMPTS[:1], return_tensors="pt", return_token_type_ids=False)["input_ids"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(ids).logits
        with merged_adapters(model):
            # the base weights hold W + s·BA and the LoRA branch is off
            assert all(layer.disable_adapters for layer in _lora(model))
            assert any(
                not torch.equal(layer.get_base_layer().weight, before[n + ".base_layer.weight"])
                for n, layer in model.named_modules()
                if layer in _lora(model)
            )
            merged = model(ids).logits
        assert not any(layer.disable_adapters for layer in _lora(model))
        with model.disable_adapter(), merged_adapters(model):  # the reference policy: never merged
            weights = [layer.get_base_layer().weight for layer in _lora(model)]
            assert all(
                torch.equal(w, before[n + ".base_layer.weight"])
                for w, (n, layer) in zip(weights, [(n, m) for n, m in model.named_modules() if m in _lora(model)])
            )
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the original tensors are put back: bit for bit, no drift


def _lora(model):
    from lab.sampling import _lora_layers

    return _lora_layers(model)


def test_merged_sampling_matches_unmerged(tokenizer, monkeypatch):
    """Same greedy tokens and same seeded samples with and without merging the adapter."""
    import contextlib

    import lab.sampling

    model = make_lora_llama()
    runs = {}
    for name in ["merged", "unmerged"]:
        if name == "unmerged":
            monkeypatch.setattr(lab.sampling, "merged_adapters", lambda m: contextlib.nullcontext(m))
        runs[name] = (
            generate(model, tokenizer, PROMPTS, 8, greedy=True).completion_ids,
            generate(model, tokenizer, PROMPTS * 2, 8, generator=torch.Generator().manual_seed(1)).completion_ids,
        )
    assert torch.equal(runs["merged"][0], runs["unmerged"][0])
    assert torch.equal(runs["merged"][1], runs["unmerged"][1])


def test_repeated_prompts_prefill_once_and_match_hf(model, tokenizer):
    """G copies of each prompt (GRPO's layout): one prefill per distinct prompt, the same greedy tokens
    as HF generate on the copies."""
    prompts = [p for p in PROMPTS for _ in range(3)]
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        ours = generate(model, tokenizer, prompts, 6, greedy=True)
    finally:
        hook.remove()
    assert calls[0][0] == len(PROMPTS)  # the prefill ran on the 4 distinct prompts, not 12 rows
    expected = hf_greedy(model, tokenizer, prompts, 6)
    T = ours.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids, expected[:, :T])


def test_gumbel_max_sampling_matches_softmax():
    """Gumbel-max on fixed logits: 20,000 draws of a 6-way distribution vs softmax(z/τ) (chi-square, mean + 6 sd)."""
    from lab.sampling import _next_token

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20_000, 1)  # (N, 6)
    for tau in [1.0, 0.5]:
        draws = _next_token(logits, tau, 1.0, False, torch.Generator().manual_seed(0))  # (N,)
        counts = torch.bincount(draws, minlength=6).double()
        probs = (logits[0] / tau).double().softmax(-1)
        stat, df = chi_square(counts, probs)
        assert stat < df + 6 * math.sqrt(2 * df)


def test_merged_adapters_leave_bf16_weights_alone():
    """In bf16, W + Δ would round most of a small Δ away: such a model samples through its LoRA branch unmerged,
    so what it samples is the policy being trained."""
    from lab.sampling import merged_adapters

    model = make_lora_llama().to(torch.bfloat16).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged_adapters(model):
        assert not any(layer.disable_adapters for layer in _lora(model))  # the LoRA branch still runs
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
