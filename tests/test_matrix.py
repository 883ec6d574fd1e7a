"""Every method × {full, lora, qlora} × {qwen2, llama, gpt2}: two steps each on the zoo's tiny models.

The data is the user's own, in TRL's formats (conversational rows for the chat models, plain strings for GPT-2,
which has no chat template); RL rewards come from a ``python:module:function``. Each cell checks what a real model
run needs: the run finishes its steps, the chat template reaches the model, generation stops at the template's end
token, the saved adapter loads with ``peft.PeftModel.from_pretrained``, and the reference policy (adapters off) is
the base model. The CLI's eval and generate are run on one saved adapter per architecture.
"""

import dataclasses
import json
import os
import sys

import pytest
import torch

from lab import zoo
from lab.data import write_jsonl
from lab.methods import get_method
from lab.modeling import load_policy
from lab.records import load_run
from lab.sampling import end_token_ids, format_prompt

pytestmark = pytest.mark.slow

MODES = ("full", "lora", "qlora")
METHODS = [
    ("sft", {}),
    ("rm", {}),
    *[("dpo", {"loss_type": t}) for t in ("sigmoid", "length_normalized", "simpo", "ipo")],
    ("sft-preferred", {}),
    ("best-of-n", {}),
    ("reinforce", {}),
    ("grpo", {"group_size": 2}),
    ("ppo", {"ppo_epochs": 1, "num_minibatches": 1}),
]
RL = ("reinforce", "grpo", "ppo")
# the token that ends an assistant turn in each template (GPT-2 has no template: its document end)
TURN_END = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "gpt2": "<|endoftext|>"}
QUESTIONS = [
    ("what is 2 + 3?", "5", "6"),
    ("name a colour.", "blue", "seven"),
    ("say hi.", "hi", "bye"),
    ("what is 4 + 4?", "8", "9"),
]

REWARD_MODULE = '''
def reward(completions, **kwargs):
    """Longer answers score more; TRL's call convention (conversational completions are message lists)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 5) for t in texts]
'''


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """JSONL files in TRL's formats: {chat|plain} × {prompts, prefs, sft}; and the reward module on sys.path."""
    root = tmp_path_factory.mktemp("matrix-data")
    files = {}
    for style in ("chat", "plain"):
        p = (lambda q: _user(q)) if style == "chat" else (lambda q: f"Question: {q}\nAnswer:")
        a = (lambda t: _assistant(t)) if style == "chat" else (lambda t: f" {t}")
        files[style, "prompts"] = write_jsonl(
            root / f"{style}-prompts.jsonl", [{"prompt": p(q)} for q, _, _ in QUESTIONS]
        )
        files[style, "prefs"] = write_jsonl(
            root / f"{style}-prefs.jsonl", [{"prompt": p(q), "chosen": a(c), "rejected": a(r)} for q, c, r in QUESTIONS]
        )
        files[style, "sft"] = write_jsonl(
            root / f"{style}-sft.jsonl", [{"prompt": p(q), "completion": a(c)} for q, c, _ in QUESTIONS]
        )
    (root / "matrix_rewards.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    yield files
    sys.path.remove(str(root))


def _config(method, arch, mode, model, data, out, run_id, extra):
    """The method's config with two tiny steps; fields a method does not have are left out."""
    cls, _ = get_method(method)
    kind = {"sft": "sft", "rm": "prefs", "dpo": "prefs", "sft-preferred": "prefs"}.get(method, "prompts")
    style = "plain" if arch == "gpt2" else "chat"
    wanted = dict(
        task=f"jsonl:{data[style, kind]}",
        model=model,
        mode=mode,
        steps=2,
        batch_size=2,
        max_length=64,
        max_new_tokens=6,
        eval_size=2,
        eval_every=0,
        eval_pairs=2,
        kl_samples=2,
        sample_every=1,
        out=str(out),
        run_id=run_id,
        device="cpu",
        seed=0,
        lr=1e-3,
        reward="python:matrix_rewards:reward",
        lora_r=4,
        lora_alpha=8,
        **extra,
    )
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in wanted.items() if k in names})


def _train(method, cfg):
    _, train = get_method(method)
    return list(train(cfg))


def _checkpoint(out, run_id):
    return os.path.join(out, run_id, "checkpoints", "final")


def _check_adapter(ckpt, model_dir, *, policy_adapter=True):
    """The adapter loads with plain peft; and, for a policy, its reference is exactly the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert os.path.exists(os.path.join(ckpt, "adapter_config.json")), os.listdir(ckpt)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ckpt)
    if policy_adapter:
        policy = load_policy(ckpt, mode="lora", device="cpu")
        policy.model.eval()
        with torch.no_grad(), policy.reference() as ref:
            assert torch.allclose(ref(input_ids=ids).logits, expected, atol=1e-5)


def _check_template_reached_the_model(arch, out, run_id, tokenizer):
    """RL samples record the prompt as the model saw it: the rendered chat template for conversational rows."""
    prompts = {s.get("prompt") for s in load_run(os.path.join(out, run_id)).samples}
    if arch == "gpt2":
        expected = {f"Question: {q}\nAnswer:" for q, _, _ in QUESTIONS}
    else:
        expected = {format_prompt(tokenizer, _user(q)) for q, _, _ in QUESTIONS}
        assert all(TURN_END[arch] in text for text in expected)  # the template was rendered
    assert prompts and prompts <= expected, prompts


@pytest.mark.parametrize("arch", zoo.ARCHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "method,extra", METHODS, ids=[m if not e else f"{m}-{e.get('loss_type', '')}".rstrip("-") for m, e in METHODS]
)
def test_cell(zoo_model, data, tmp_path, method, extra, mode, arch):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    model_dir = zoo_model(arch)
    out = tmp_path / "runs"
    run_id = f"{method}-{mode}-{arch}"
    if method == "best-of-n":
        from lab.baselines import BestOfNConfig, run_best_of_n

        _train("rm", _config("rm", arch, mode, model_dir, data, out, "rm", {}))
        style = "plain" if arch == "gpt2" else "chat"
        result = run_best_of_n(
            BestOfNConfig(
                reward_model=_checkpoint(out, "rm"),
                n=2,
                rounds=1,
                eval_size=2,
                task=f"jsonl:{data[style, 'prompts']}",
                model=model_dir,
                max_new_tokens=6,
                device="cpu",
            )
        )
        assert result["picks"] == 2
        return
    cfg = _config(method, arch, mode, model_dir, data, out, run_id, extra)
    metrics = _train(method, cfg)
    assert len(metrics) == 2
    ckpt = _checkpoint(out, run_id)
    assert os.path.isdir(ckpt)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if method in RL:
        _check_template_reached_the_model(arch, out, run_id, tokenizer)
    if mode != "full":
        _check_adapter(ckpt, model_dir, policy_adapter=method != "rm")


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_generation_stops_at_the_templates_end(zoo_model, arch):
    """A model that always emits the template's turn end stops at once; BOS reaches the model at most once."""
    from lab.sampling import generate

    policy = load_policy(zoo_model(arch), mode="lora", device="cpu")
    tok = policy.tokenizer
    ends = end_token_ids(tok, policy.model)
    assert tok.convert_tokens_to_ids(TURN_END[arch]) in ends and tok.eos_token_id in ends
    turn_end = tok.convert_tokens_to_ids(TURN_END[arch])

    def favour_turn_end(module, args, logits):
        logits[..., turn_end] += 1e4  # (B, L, V): the turn end wins every draw
        return logits

    prompt = "Question: say hi.\nAnswer:" if arch == "gpt2" else _user("say hi.")
    hook = policy.model.get_output_embeddings().register_forward_hook(favour_turn_end)
    try:
        roll = generate(policy.model, tok, [prompt, prompt], 5, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert roll.completions == ["", ""] and not roll.truncated.any()
    if tok.bos_token_id is not None and arch == "llama":
        real = roll.prompt_ids[roll.prompt_mask.bool()].view(2, -1)  # (B, P) the prompt without padding
        assert ((real == tok.bos_token_id).sum(-1) == 1).all()  # the template's BOS, not a second one


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_cli_eval_and_generate_on_a_saved_adapter(zoo_model, data, tmp_path, arch, lab_cli):
    _lab = lab_cli
    model_dir = zoo_model(arch)
    out = tmp_path / "runs"
    _train("grpo", _config("grpo", arch, "lora", model_dir, data, out, "g", {"group_size": 2}))
    ckpt = _checkpoint(out, "g")
    prompts = f"jsonl:{data['plain' if arch == 'gpt2' else 'chat', 'prompts']}"
    gen = _lab("generate", "--model", ckpt, "--task", prompts, "--n", "2", "--max-new-tokens", "4", "--json")
    assert gen.returncode == 0, gen.stderr[-2000:]
    rows = [json.loads(line) for line in gen.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    ev = _lab("eval", "--model", ckpt, "--task", prompts, "--n", "2", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
