"""Conditional SFT on pairs (lab/csft.py): the control string goes exactly where the paper card says, evaluation
generates behind c_good, and a few steps train and write the record."""

from __future__ import annotations

import pytest
import torch

from lab.config import ConfigError
from lab.csft import (
    ControlledTask,
    CSFTConfig,
    control_kl,
    control_prompt,
    encode_controlled_pairs,
    heldout,
    train,
)
from lab.modeling import load_policy, load_tokenizer
from lab.sampling import encode_prompt
from lab.tasks import get_task

ROWS = [
    {"prompt": "review of the pasta :", "chosen": "the pasta was great .", "rejected": "the pasta was awful ."},
    {"prompt": "review of the film :", "chosen": "the film was good .", "rejected": "the film was bland and bland ."},
]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"good": "x", "bad": "x"}, "bad"),
        ({"good": " good"}, "good"),
        ({"bad": ""}, "bad"),
        ({"task": "arith"}, "task"),
    ],
)
def test_config_names_the_bad_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        CSFTConfig(**overrides)


def test_the_control_is_context_between_prompt_and_answer():
    """Row i: encode(x + " good") + encode(y_w) + eos, with the loss mask on y_w and eos only; row B + i: the same
    with " bad" and y_l. The control's token is the one word `good` (or `bad`) of the reviews vocabulary."""
    tok = load_tokenizer("reviews")
    batch = encode_controlled_pairs(tok, ROWS, "good", "bad", max_length=64)
    good, bad = tok.convert_tokens_to_ids("good"), tok.convert_tokens_to_ids("bad")
    for i, row in enumerate(ROWS):
        for r, side, control in ((i, "chosen", good), (len(ROWS) + i, "rejected", bad)):
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            expected = prompt + [control] + answer
            n = int(batch.attention_mask[r].sum())
            assert batch.input_ids[r, :n].tolist() == expected
            assert batch.completion_mask[r, :n].tolist() == [0] * (len(prompt) + 1) + [1] * len(answer)
    assert control_prompt(tok, "review of the pasta :", "good") == "review of the pasta : good"


@pytest.mark.parametrize(
    "arch, end, header", [("qwen2", "<|im_end|>", "assistant\n"), ("llama", "<|eot_id|>", "<|end_header_id|>\n\n")]
)
def test_a_chat_prompt_gets_the_control_after_the_assistant_header(zoo_model, arch, end, header):
    """The template ends with the assistant's header, the control follows with no space, and the answer ends with
    the turn end, as ``encode_pairs`` ends it; Llama 3's BOS appears once. The tokens are those of the one string."""
    tok = load_tokenizer(zoo_model(arch))
    prompt = [{"role": "user", "content": "review of the pasta :"}]
    text = control_prompt(tok, prompt, "good")
    assert text.endswith(header + "good")
    pairs = [{"prompt": prompt, "chosen": "fine .", "rejected": "no ."}]
    batch = encode_controlled_pairs(tok, pairs, "good", "bad", 64)
    context = encode_prompt(tok, text)
    n = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, : len(context)].tolist() == context
    assert int(batch.input_ids[0, n - 1]) == tok.convert_tokens_to_ids(end)
    assert batch.completion_mask[0, : len(context)].sum() == 0
    if arch == "llama":
        assert batch.input_ids[0].tolist().count(tok.bos_token_id) == 1


def test_one_step_on_your_own_pairs_with_a_plain_model(zoo_model, tmp_path):
    """GPT-2 shape, plain-text prompts from a jsonl file (no task, no gold reward): the step trains, and the
    held-out numbers are kl/ref and diversity of samples behind " good"."""
    import json
    import math

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}: say something", "chosen": " yes indeed", "rejected": " no"} for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = CSFTConfig(
        task=f"jsonl:{data}",
        model=zoo_model("gpt2"),
        steps=1,
        batch_size=2,
        eval_size=2,
        kl_samples=2,
        max_new_tokens=4,
        out=str(tmp_path),
        run_id="own",
    )
    last = list(train(cfg))[-1]
    assert math.isfinite(last["kl/ref"]) and "diversity/distinct_1" in last and "eval/gold_reward" not in last


def test_a_truncated_answer_gets_no_end_token():
    tok = load_tokenizer("reviews")
    rows = [{**ROWS[0], "chosen_truncated": True}]
    batch = encode_controlled_pairs(tok, rows, "good", "bad", max_length=64)
    n = int(batch.attention_mask[0].sum())
    assert int(batch.input_ids[0, n - 1]) != tok.eos_token_id
    assert int(batch.input_ids[1, int(batch.attention_mask[1].sum()) - 1]) == tok.eos_token_id


def _tiny(tmp_path, **overrides) -> CSFTConfig:
    base = dict(
        task="reviews", steps=2, batch_size=4, eval_size=2, kl_samples=2, out=str(tmp_path), run_id="c", lr=1e-2
    )
    return CSFTConfig(**{**base, **overrides})


def test_evaluation_generates_behind_the_good_control(monkeypatch):
    """Every prompt the held-out evaluation samples or answers ends with " good"; the gold reward still sees x."""
    import lab.evaluate
    import lab.sampling

    seen = []
    original = lab.sampling.generate

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return original(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(lab.evaluate, "generate", recording)
    task = get_task("reviews")
    policy = load_policy(task.model, mode="lora")
    out = heldout(policy, task, _tiny("unused"))
    assert seen and all(p.endswith(" good") for p in seen)
    assert {"eval/gold_reward", "eval/sample_reward", "kl/ref", "diversity/distinct_1"} <= set(out)
    controlled = ControlledTask(task, policy.tokenizer, "good")
    prompts = controlled.eval_prompts()[:3]
    completions = ["the soup was great .", "the soup was great and great .", "it was awful"]
    assert controlled.gold_rewards(prompts, completions) == task.gold_rewards(task.eval_prompts()[:3], completions)


def test_control_kl_without_a_control_is_the_plain_sampled_kl(tmp_path):
    """Given a rollout of the plain prompts, KL(π_θ(·|x, c) ‖ π_ref(·|x)) is KL(π_θ ‖ π_ref) of ``sampled_kl``."""
    from lab.evaluate import sample_heldout, sampled_kl

    cfg = _tiny(tmp_path)
    task = get_task("reviews")
    policy = load_policy(task.model, mode="lora")
    for _ in train(cfg, policy=policy):
        pass
    prompts = task.eval_prompts()[:3]
    roll = sample_heldout(policy, prompts, max_new_tokens=task.max_new_tokens, samples=2, seed=0)
    expected = sampled_kl(policy, roll)
    assert abs(expected) > 1e-4  # the policy moved, so the check is not 0 = 0
    assert control_kl(policy, roll, [p for p in prompts for _ in range(2)]) == pytest.approx(expected, rel=1e-4)


def _params(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def test_a_few_steps_change_parameters_and_write_the_record(tmp_path):
    from lab.records import load_run

    cfg = _tiny(tmp_path)
    task = get_task("reviews")
    policy = load_policy(task.model, mode="lora")
    before = _params(policy)
    history = list(train(cfg, policy=policy))
    after = _params(policy)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    last = history[-1]
    for key in ("loss/sft", "logprobs/chosen", "logprobs/rejected", "grad/norm", "eval/gold_reward", "kl/ref"):
        assert key in last, key
    run = load_run(tmp_path / "c")
    assert run.status["status"] == "completed"
    assert [m["step"] for m in run.metrics] == [1, 2]
    assert "eval/gold_reward" in run.status["summary"]["before"]
    assert run.samples and all(s["prompt"].endswith(" good") for s in run.samples)


def test_controls_the_tokenizer_cannot_tell_apart_are_refused_in_one_line():
    """On bandit's 37-word vocabulary neither control is a word, so the task is refused; on reviews a made-up word
    reads as <unk>, and two of them would be one control."""
    from lab.config import ConfigError
    from lab.csft import check_controls
    from lab.tasks.base import load_builtin

    with pytest.raises(ConfigError, match="^task: bandit's 37-word vocabulary"):
        CSFTConfig(task="bandit")
    _, tokenizer = load_builtin("reviews")
    check_controls(tokenizer, "good", "bad")  # two known words, two different tokens
    with pytest.raises(ConfigError, match="^good: 'zzzqqq' holds a word this tokenizer does not know"):
        check_controls(tokenizer, "zzzqqq", "bad")
    with pytest.raises(ConfigError, match="^bad: 'great' and good 'great' encode to the same tokens"):
        check_controls(tokenizer, "great", "great")


def test_the_registry_reaches_it():
    from lab.methods import available, get_method

    assert "csft" in available()
    assert get_method("csft") == (CSFTConfig, train)
