"""Shared fixtures: a tiny random Llama saved in Hugging Face format, and quiet, offline, CPU-only settings."""

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
warnings.filterwarnings("ignore", message=".*kernels.*")

import torch  # noqa: E402

# The built-in models are tiny: one thread avoids the synchronisation cost that dominates at this size.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random LlamaForCausalLM with a 64-word WordLevel tokenizer, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny")
    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(61)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def zoo_model(tmp_path_factory):
    """``zoo_model(arch)`` → the folder of a ``tiny`` random model from lab/zoo.py (qwen2, llama or gpt2).

    Each arch is built once per session (its BPE tokenizer is trained once too), then shared by every test.
    qwen2 gets the trained 32k BPE even where the real Qwen tokenizer is installed: the mechanics are the same
    (tests/test_zoo.py checks both) and a 151k vocabulary makes every training step five times slower.
    """
    from lab.zoo import make_model

    built: dict[str, str] = {}

    def build(arch: str) -> str:
        if arch not in built:
            path = tmp_path_factory.mktemp(f"zoo-{arch}")
            make_model(arch, "tiny", path, seed=0, real_tokenizer=False)
            built[arch] = str(path)
        return built[arch]

    return build


@pytest.fixture()
def lab_cli():
    """``lab_cli(*args)`` runs ``python -m lab ARGS`` in this process and returns (returncode, stdout, stderr).
    tests/test_cli.py covers the real subprocess; a new interpreter per call would mostly re-import torch."""
    import contextlib
    import io
    from types import SimpleNamespace

    from lab.cli import main

    def run(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:
                code = exit_.code
        return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

    return run


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` → a TCP port on 127.0.0.1 that nothing listens on right now (for serving the app)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
