"""Real-model paths on stand-ins of real shapes (lab.zoo): memory-sized microbatches, metrics outside the graph,
dataset columns for rewards, own-data CLI paths, chat-template checks before loading, own-model defaults,
checkpoints that survive a failing evaluation, and the GPU options that can be checked on the CPU."""

import json

import pytest
import torch

from lab.config import ConfigError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def math_rows(tmp_path):
    """GSM8K-shaped chat rows: a question as the user's turn and an ``answer`` column ("... #### N")."""
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": f"{a}+{b}={a + b} #### {a + b}"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
    ]
    return write_jsonl(tmp_path / "math.jsonl", rows)


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """A TRL-style reward function module on sys.path: ``f(completions, answer, **kwargs)``; it records what it saw."""
    (tmp_path / "trl_style_rewards.py").write_text(
        "SEEN = []\n"
        "def by_answer(completions, answer, **kwargs):\n"
        "    SEEN.append({'answer': list(answer), 'keys': sorted(kwargs), 'n': len(completions)})\n"
        "    return [float(len(c) % 2) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import trl_style_rewards

    importlib.reload(trl_style_rewards)
    return trl_style_rewards


# ----------------------------------------------------------------------------------------------------------------------
# memory


def test_entropy_is_a_metric_outside_the_graph(tiny_model_dir):
    """The entropy comes from the same forward pass but must not keep a (B, T, V) float32 copy in autograd."""
    from lab.modeling import load_policy
    from lab.ops import completion_token_logprobs_and_entropy

    policy = load_policy(tiny_model_dir, mode="lora")
    ids = torch.randint(3, 64, (2, 6))
    logprobs, entropy = completion_token_logprobs_and_entropy(policy.model, ids, torch.ones_like(ids), 3)
    assert logprobs.requires_grad and not entropy.requires_grad and entropy.grad_fn is None


def test_auto_microbatch_hand_computed():
    """Qwen2.5-0.5B shape: V = 151,936, H = 896, L = 24. A row of 64 tokens costs
    64 · (12 · 151,936 + 68 · 896 · 24) = 64 · (1,823,232 + 1,462,272) = 210,272,256 bytes.
    A 1 GB budget fits 1e9 // 210,272,256 = 4 rows → the largest divisor of 64 that is ≤ 4 is 4;
    of 36 rows, 4 too; of 30 rows, 3. A budget below one row still gives 1."""
    from types import SimpleNamespace

    from lab.runner import auto_microbatch

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=151_936, hidden_size=896, num_hidden_layers=24))
    assert auto_microbatch(model, 64, 64, budget_bytes=1_000_000_000) == 4
    assert auto_microbatch(model, 36, 64, budget_bytes=1_000_000_000) == 4
    assert auto_microbatch(model, 30, 64, budget_bytes=1_000_000_000) == 3
    assert auto_microbatch(model, 64, 64, budget_bytes=1) == 1
    assert auto_microbatch(model, 64, 64, budget_bytes=10**15) == 64  # everything fits: one pass
    gpt2 = SimpleNamespace(config=SimpleNamespace(vocab_size=50_257, n_embd=768, n_layer=12))  # GPT-2's names
    per_row = 10 * (12 * 50_257 + 68 * 768 * 12)
    assert auto_microbatch(gpt2, 8, 10, budget_bytes=2 * per_row) == 2


def _forward_shapes(model) -> list[tuple[int, int]]:
    """Record (batch, length) of every forward pass through ``model``'s decoder trunk."""
    shapes: list[tuple[int, int]] = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk = getattr(base, base.base_model_prefix)
    trunk.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(
            tuple(
                (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[:2]
            )
        ),
        with_kwargs=True,
    )
    return shapes


def test_grpo_forward_passes_fit_the_memory_budget(zoo_model, math_rows, reward_module, tmp_path, monkeypatch):
    """With a 151k vocabulary, a real-size rollout scored in one forward pass makes a logits tensor of gigabytes
    (rows × tokens × 151k × 4 bytes); under a budget for 2 rows every training and no-grad pass holds at most 2
    completions, and the run still completes."""
    from lab.grpo import GRPOConfig, train
    from lab.runner import auto_microbatch, load_for

    model_dir = zoo_model("qwen2")
    cfg = GRPOConfig(
        task=f"jsonl:{math_rows}",
        model=model_dir,
        reward="python:trl_style_rewards:by_answer",
        steps=1,
        batch_size=2,
        group_size=4,
        max_new_tokens=6,
        beta=0.1,
        num_iterations=2,
        out=str(tmp_path),
        eval_every=0,
    )
    policy = load_for(cfg)
    per_row = 6 * (
        12 * policy.model.config.vocab_size
        + 68 * policy.model.config.hidden_size * policy.model.config.num_hidden_layers
    )
    monkeypatch.setenv("LAB_MICROBATCH_GB", str(2.5 * per_row / 1e9))
    assert auto_microbatch(policy.model, 8, 6) == 2
    shapes = _forward_shapes(policy.model)
    metrics = list(train(cfg, policy=policy))
    assert len(metrics) == 1 and "kl/ref" in metrics[0] and "entropy" in metrics[0]
    # sampling: a prefill, then one position per decode step (a (B, V) row each); every later pass scores whole
    # completions (π_old and π_ref without grad, then the μ = 2 training passes): at most 2 rows each
    scoring = [b for b, length in shapes[1:] if length > 1]
    assert len(scoring) >= 2 * 4 + 4 and max(scoring) <= 2, shapes


def test_reward_functions_see_dataset_columns_like_trl(zoo_model, math_rows, reward_module, tmp_path):
    """A TRL-style ``f(completions, answer, **kwargs)`` receives the rows' ``answer`` column, aligned with the
    G completions of each prompt, plus TRL's ``completion_ids``."""
    from lab.grpo import GRPOConfig, train

    cfg = GRPOConfig(
        task=f"jsonl:{math_rows}",
        model=zoo_model("qwen2"),
        reward="python:trl_style_rewards:by_answer",
        steps=1,
        batch_size=2,
        group_size=2,
        max_new_tokens=4,
        out=str(tmp_path),
        eval_every=0,
    )
    list(train(cfg))
    seen = reward_module.SEEN[-1]
    assert seen["n"] == 4 and len(seen["answer"]) == 4
    assert seen["answer"][0] == seen["answer"][1] and seen["answer"][0].endswith(
        ("#### 3", "#### 7", "#### 11", "#### 15")
    )
    assert "completion_ids" in seen["keys"]


def test_math_reward_runs_grpo_on_gsm8k_shaped_rows(zoo_model, tmp_path):
    """``--reward math`` with GSM8K's own columns (question / answer), as `hf:openai/gsm8k:main` gives them."""
    from lab.grpo import GRPOConfig, train

    rows = [{"question": f"{a} + {b}?", "answer": f"#### {a + b}"} for a, b in [(1, 1), (2, 2)]]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    metrics = list(
        train(
            GRPOConfig(
                task=data,
                model=zoo_model("qwen2"),
                reward="math",
                steps=1,
                batch_size=2,
                group_size=2,
                max_new_tokens=3,
                out=str(tmp_path),
                eval_every=0,
            )
        )
    )
    assert metrics[0]["reward/mean"] in (0.0, 0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer and template checks before the model loads


def test_chat_rows_without_a_template_fail_before_the_model_loads(tiny_model_dir, math_rows, tmp_path, monkeypatch):
    """tiny_model_dir's tokenizer has no chat template: one ConfigError naming the model, and no model load."""
    import lab.modeling
    from lab.grpo import GRPOConfig, train

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the template check")

    monkeypatch.setattr(lab.modeling, "load_causal_lm", no_load)
    cfg = GRPOConfig(
        task=f"jsonl:{math_rows}", model=tiny_model_dir, reward="math", steps=1, out=str(tmp_path / "runs")
    )
    with pytest.raises(ConfigError, match="no chat template"):
        next(train(cfg))
    assert not (tmp_path / "runs").exists()  # no run folder for a run that never started


# ----------------------------------------------------------------------------------------------------------------------
# the CLI on your own data


def test_cli_eval_generate_and_bon_on_own_data(zoo_model, math_rows, tmp_path, lab_cli):
    run_cli = lab_cli
    model = zoo_model("qwen2")
    out = run_cli(
        "eval",
        "--task",
        f"jsonl:{math_rows}",
        "--model",
        model,
        "--reward",
        "math",
        "--n",
        "2",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["n"] == 2 and result["reward"] == "math" and 0.0 <= result["reward/mean"] <= 1.0

    out = run_cli(
        "generate",
        "--task",
        f"jsonl:{math_rows}",
        "--model",
        model,
        "--n",
        "2",
        "--greedy",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and "reward" not in rows[0]  # no --reward: nothing to score with

    out = run_cli("eval", "--task", f"jsonl:{math_rows}", "--n", "2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--model" in out.stderr


def test_cli_generate_prompt_uses_the_chat_template_and_no_task_reward(zoo_model, tmp_path, lab_cli):
    run_cli = lab_cli
    """``generate --model M --prompt TEXT``: the text is a user turn of M's template, and nothing scores it."""
    from lab.modeling import load_tokenizer

    model = zoo_model("qwen2")
    out = run_cli(
        "generate", "--model", model, "--prompt", "hello there", "--greedy", "--max-new-tokens", "3", "--json"
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[0])
    rendered = load_tokenizer(model).apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert "reward" not in row and row["prompt"] == rendered and rendered.endswith("<|im_start|>assistant\n")
    out = run_cli(
        "generate", "--model", model, "--prompt", "hello", "--raw", "--greedy", "--max-new-tokens", "2", "--json"
    )
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[0])["prompt"] == "hello"


def test_relative_model_path_is_stored_absolute_in_the_adapter(zoo_model, tmp_path, monkeypatch):
    """An adapter trained on ``./model`` loads from any other working directory."""
    import shutil

    from lab.modeling import load_policy

    work = tmp_path / "work"
    shutil.copytree(zoo_model("gpt2"), work / "model")
    monkeypatch.chdir(work)
    policy = load_policy("./model", mode="lora")
    policy.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "model")
    monkeypatch.chdir(tmp_path)
    assert load_policy(str(tmp_path / "adapter")).mode == "lora"


# ----------------------------------------------------------------------------------------------------------------------
# defaults, records and checkpoints


def test_own_model_learning_rate_defaults(zoo_model):
    """1e-3 suits the tiny built-in models; a real model's adapter gets 2e-5, full fine-tuning 1e-6 (TRL's)."""
    from lab.dpo import DPOConfig
    from lab.grpo import GRPOConfig

    assert GRPOConfig().lr == 1e-3 and DPOConfig().lr == 3e-4
    assert GRPOConfig(model=zoo_model("qwen2"), task="jsonl:x.jsonl", reward="math").lr == 2e-5
    assert DPOConfig(model="Qwen/Qwen2.5-0.5B-Instruct", task="jsonl:x.jsonl", mode="full").lr == 1e-6
    assert GRPOConfig(model="Qwen/Qwen2.5-0.5B-Instruct", task="jsonl:x.jsonl", reward="math", lr=5e-5).lr == 5e-5


def test_step_metrics_carry_memory_and_throughput(tmp_path):
    from lab.grpo import GRPOConfig, train

    metrics = list(
        train(
            GRPOConfig(task="arith", steps=2, batch_size=2, group_size=2, eval_every=0, eval_size=2, out=str(tmp_path))
        )
    )
    for m in metrics:
        assert m["memory/peak_gb"] > 0.05 and m["time/tokens_per_s"] > 0 and m["time/step_s"] > 0


def test_a_failing_last_evaluation_keeps_the_trained_weights(tmp_path, monkeypatch):
    """DPO evaluates inside its last step; when that fails, the run is 'failed' but the weights are saved."""
    import lab.preference
    from lab.dpo import DPOConfig, train
    from lab.records import load_run

    calls = {"n": 0}
    real = lab.preference.preference_heldout

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the "before" evaluation works, the last one runs out of memory
            raise RuntimeError("out of memory in the evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(lab.preference, "preference_heldout", failing)
    gen = train(
        DPOConfig(
            task="reviews", steps=2, batch_size=4, eval_size=2, kl_samples=1, out=str(tmp_path), run_id="dpo-fails"
        )
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        list(gen)
    run = load_run(tmp_path / "dpo-fails")
    assert run.status["status"] == "failed"
    assert (tmp_path / "dpo-fails" / "checkpoints" / "last" / "adapter_model.safetensors").exists()


def test_ppo_checkpoint_holds_the_value_head(tmp_path):
    from lab.ppo import PPOConfig, train

    list(
        train(
            PPOConfig(
                task="reviews",
                steps=1,
                batch_size=4,
                num_minibatches=1,
                ppo_epochs=1,
                eval_size=2,
                out=str(tmp_path),
                run_id="ppo",
            )
        )
    )
    final = tmp_path / "ppo" / "checkpoints" / "final"
    head = torch.load(final / "value_head.pt")
    assert set(head) == {"weight", "bias"} and (final / "value" / "adapter_model.safetensors").exists()


def _one_step(method: str, cfg_kwargs: dict, task: str, tmp_path) -> tuple[dict, dict]:
    """(metrics, LoRA weights) after one step of ``method`` from the same starting adapter."""
    from lab.methods import get_method
    from lab.modeling import load_policy

    config_cls, train = get_method(method)
    torch.manual_seed(0)  # the same LoRA A matrices every time
    policy = load_policy(task, mode="lora")
    with torch.no_grad():  # the same adapter every time, with a non-zero B so every gradient is non-trivial
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    metrics = next(train(config_cls(task=task, steps=1, out=str(tmp_path), **cfg_kwargs), policy=policy))
    return metrics, {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(
    "method, task, kwargs, keys",
    [
        ("dpo", "reviews", {"batch_size": 4, "eval_size": 2, "kl_samples": 1}, ("loss/dpo", "rewards/margin")),
        (
            "sft-preferred",
            "reviews",
            {"batch_size": 4, "eval_size": 2, "kl_samples": 1},
            ("loss/sft", "logprobs/mean", "ppl", "tokens", "rewards/margin"),
        ),
        (
            "sft-preferred",
            "reviews",
            {"batch_size": 4, "eval_size": 2, "kl_samples": 1, "per_sequence": True},
            ("loss/sft", "ppl"),
        ),
        ("sft", "arith", {"batch_size": 4, "eval_size": 2}, ("loss/sft", "logprobs/mean", "ppl", "tokens")),
        (
            "reinforce",
            "arith",
            {"batch_size": 4, "eval_every": 0, "eval_size": 2, "beta": 0.1},
            ("loss/policy", "logprobs/mean", "entropy", "kl/ref"),
        ),
    ],
)
def test_microbatches_give_the_same_update(method, task, kwargs, keys, tmp_path):
    """One pass over the whole batch and microbatches of one row: the same metrics and the same update."""
    (one, w1), (many, w2) = (
        _one_step(method, {**kwargs, "microbatch_size": micro}, task, tmp_path) for micro in (None, 1)
    )
    for key in keys + ("grad/norm",):
        assert one[key] == pytest.approx(many[key], rel=1e-4, abs=1e-6), key
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# GPU options that the CPU can check


def test_dtype_follows_the_hardware(monkeypatch):
    """bf16 where native; a T4 (no native bf16) computes in fp32, since fp16 without loss scaling would underflow
    the gradients that reach the adapters; the CPU computes in fp32."""
    from lab.modeling import pick_dtype

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert pick_dtype(cuda) == torch.bfloat16 and pick_dtype(cuda, frozen_base=True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pick_dtype(cuda, frozen_base=True) == torch.float32 and pick_dtype(cuda) == torch.float32
    assert pick_dtype(torch.device("cpu"), frozen_base=True) == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(zoo_model):
    from lab.modeling import load_policy
    from lab.ops import completion_token_logprobs

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = load_policy(zoo_model("qwen2"), mode="lora", gradient_checkpointing=checkpointing)
        with torch.no_grad():  # the same adapter both times, whatever the global RNG did while loading
            for n, p in policy.model.named_parameters():
                if "lora_" in n:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        policy.model.train()
        ids = torch.arange(10, 22).view(2, 6)
        completion_token_logprobs(policy.model, ids, torch.ones_like(ids), 3).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


def test_eight_bit_optimizers_are_refused_on_the_cpu_in_one_line():
    from types import SimpleNamespace

    from lab.runner import make_optimizer

    with pytest.raises(ConfigError, match="optim: paged_adamw_8bit runs on a GPU only"):
        make_optimizer(
            [torch.nn.Parameter(torch.zeros(2))], SimpleNamespace(lr=1e-3, weight_decay=0.0, optim="paged_adamw_8bit")
        )
    with pytest.raises(ConfigError, match="optim: must be one of"):
        from lab.sft import SFTConfig

        SFTConfig(optim="sgd")


# ----------------------------------------------------------------------------------------------------------------------
# the app


def test_before_after_on_conversational_data(zoo_model, math_rows, tmp_path):
    """After a run on chat rows, before/after answers them with the template and scores them with the run's
    reward (math here) instead of failing with "no text prompts"."""
    from types import SimpleNamespace

    from lab import live
    from lab.grpo import GRPOConfig
    from lab.runner import load_for

    cfg = GRPOConfig(task=f"jsonl:{math_rows}", model=zoo_model("qwen2"), reward="math", max_new_tokens=3)
    session = SimpleNamespace(policy=load_for(cfg), task=None, job=SimpleNamespace(cfg=cfg), compared=None)
    rows, summary = live.compare(session, n=3)
    assert len(rows) == 3 and rows[0]["prompt"].startswith("user: What is")
    assert rows[0]["before_reward"] in (0.0, 1.0) and summary["before"] is not None
    assert rows[0]["before"] == rows[0]["after"]  # an untrained adapter (B = 0) answers as the reference does


def test_dropout_is_off_so_training_and_sampling_log_probs_agree(zoo_model):
    """GPT-2's config has dropout 0.1; in train mode the log-probs must still equal eval mode's, or PPO's and
    GRPO's ratio is not 1 on the first update."""
    from lab.modeling import load_policy
    from lab.ops import completion_token_logprobs

    policy = load_policy(zoo_model("gpt2"), mode="lora")
    ids = torch.arange(100, 116).view(2, 8)
    with torch.no_grad():
        policy.model.eval()
        sampled = completion_token_logprobs(policy.model, ids, torch.ones_like(ids), 4)
        policy.model.train()
        training = completion_token_logprobs(policy.model, ids, torch.ones_like(ids), 4)
    torch.testing.assert_close(training, sampled)
