"""lab.dpo: hand-computed losses, identities, convergence to the closed-form optimum on bandit, and runs."""

import json
import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lab.batching import encode_preference_batch, pair_logprobs
from lab.config import ConfigError
from lab.dpo import (
    LOSS_TYPES,
    LOSSES,
    USES_REFERENCE,
    DPOConfig,
    PairLogprobs,
    dpo_loss,
    ipo_loss,
    length_normalized_dpo_loss,
    simpo_loss,
    train,
)
from lab.evaluate import sample_heldout, sampled_kl

REPO = Path(__file__).resolve().parents[1]
t = torch.tensor


# ---- hand-computed values ------------------------------------------------------------------------------------------


def test_dpo_loss_hand_computed():
    """β = 0.5; log π_θ = (−1, −3), log π_ref = (−2, −2) for (y_w, y_l).

    r̂_w = 0.5·(−1+2) = 0.5, r̂_l = 0.5·(−3+2) = −0.5, margin 1;
    L = −log σ(1) = log(1 + e^−1) = 0.313262.
    """
    loss, m = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert m["loss/dpo"].item() == pytest.approx(0.313262, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["rewards/accuracy"].item() == 1.0


def test_dpo_batch_is_the_mean_and_accuracy_counts_pairs():
    """Two pairs with margins +1 and −1 (β = 1): losses log(1+e^−1) = 0.313262 and log(1+e) = 1.313262,
    mean 0.813262; accuracy 1/2, mean margin 0."""
    loss, m = dpo_loss(t([0.0, -1.0]), t([-1.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=1.0)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert m["rewards/accuracy"].item() == 0.5
    assert m["rewards/margin"].item() == pytest.approx(0.0)


def test_conservative_dpo_hand_computed():
    """ε = 0.1, margin β·Δ = 1: 0.9·log(1+e^−1) + 0.1·log(1+e^1) = 0.9·0.313262 + 0.1·1.313262 = 0.413262."""
    loss, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.413262, abs=1e-6)


def test_length_normalized_dpo_hand_computed():
    """β = 1; y_w: log π_θ = −2, log π_ref = −4, |y_w| = 2 → r̂_w = 2/2 = 1;
    y_l: log π_θ = −6, log π_ref = −3, |y_l| = 3 → r̂_l = −3/3 = −1; L = log(1 + e^−2) = 0.126928.
    Plain DPO on the same numbers: margin 2 − (−3) = 5, L = log(1 + e^−5) = 0.006715."""
    loss, m = length_normalized_dpo_loss(t([-2.0]), t([-6.0]), t([-4.0]), t([-3.0]), t([2.0]), t([3.0]), beta=1.0)
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(-1.0)
    plain, _ = dpo_loss(t([-2.0]), t([-6.0]), t([-4.0]), t([-3.0]), beta=1.0)
    assert plain.item() == pytest.approx(0.006715, abs=1e-6)


def test_simpo_hand_computed():
    """β = 2, γ = 0.5; per-token log-probs −0.5 (y_w), −1.0 (y_l): r̂_w = −1, r̂_l = −2;
    L = −log σ(−1 − (−2) − 0.5) = log(1 + e^−0.5) = 0.474077."""
    loss, m = simpo_loss(t([-0.5]), t([-1.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-1.0)
    assert m["rewards/margin"].item() == pytest.approx(1.0)


def test_ipo_hand_computed():
    """β = 0.5, so the target margin 1/(2β) = 1.
    Pair 1: (−1 − (−2))/1 − (−3 − (−1))/2 = 1 − (−1) = 2 → (2 − 1)² = 1.
    Pair 2: (−2 − (−2))/1 − (−3 − (−2))/2 = 0 − (−0.5) = 0.5 → (0.5 − 1)² = 0.25.  Mean 0.625."""
    loss, m = ipo_loss(
        t([-1.0, -2.0]), t([-3.0, -3.0]), t([-2.0, -2.0]), t([-1.0, -2.0]), t([1.0, 1.0]), t([2.0, 2.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(0.625, abs=1e-6)
    assert m["rewards/chosen"].mean().item() == pytest.approx(0.5 * (1 + 0) / 2)


# ---- identities ------------------------------------------------------------------------------------------------


def test_dpo_loss_is_log2_when_policy_equals_reference():
    """π_θ = π_ref ⇒ every log-ratio is 0 ⇒ L = −log σ(0) = log 2, for any log-probs, β and lengths."""
    g = torch.Generator().manual_seed(0)
    logp_w, logp_l = -5 * torch.rand(8, generator=g), -5 * torch.rand(8, generator=g)
    lengths_w, lengths_l = torch.randint(1, 9, (8,), generator=g), torch.randint(1, 9, (8,), generator=g)
    for beta in (0.01, 0.1, 3.0):
        loss, m = dpo_loss(logp_w, logp_l, logp_w.clone(), logp_l.clone(), beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert m["rewards/margin"].item() == 0.0
        loss, _ = length_normalized_dpo_loss(logp_w, logp_l, logp_w, logp_l, lengths_w, lengths_l, beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        # IPO at π_θ = π_ref: h = 0, so L = (1/(2β))²
        loss, _ = ipo_loss(logp_w, logp_l, logp_w, logp_l, lengths_w, lengths_l, beta)
        assert loss.item() == pytest.approx(1 / (4 * beta**2), rel=1e-6)


def test_dpo_gradient_weight_is_beta_sigmoid_of_minus_beta_delta():
    """d L / d log π_θ(y_w) = −β σ(−βΔ) and d L / d log π_θ(y_l) = +β σ(−βΔ) per pair (divided by B for the
    batch mean), Δ = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))."""
    g = torch.Generator().manual_seed(1)
    B, beta = 5, 0.3
    logp_w = (-4 * torch.rand(B, generator=g)).requires_grad_()
    logp_l = (-4 * torch.rand(B, generator=g)).requires_grad_()
    ref_w, ref_l = -4 * torch.rand(B, generator=g), -4 * torch.rand(B, generator=g)
    loss, _ = dpo_loss(logp_w, logp_l, ref_w, ref_l, beta)
    loss.backward()
    delta = (logp_w - ref_w) - (logp_l - ref_l)
    weight = beta * torch.sigmoid(-beta * delta.detach())  # (B,) ∈ (0, β)
    torch.testing.assert_close(logp_w.grad, -weight / B)
    torch.testing.assert_close(logp_l.grad, weight / B)
    assert ((weight > 0) & (weight < beta)).all()


def test_loss_table_dispatches_each_variant_to_its_own_function():
    """LOSSES has one entry per loss type, and each gives what its function gives on the same numbers."""
    assert tuple(LOSSES) == LOSS_TYPES
    assert USES_REFERENCE == {"sigmoid": True, "length_normalized": True, "simpo": False, "ipo": True}
    p = PairLogprobs(t([-2.0, -4.0]), t([-6.0, -3.0]), t([2.0, 4.0]), t([3.0, 1.0]), t([-4.0, -4.5]), t([-3.0, -2.0]))
    cfg = DPOConfig(beta=0.7, simpo_gamma=0.3)
    expected = {
        "sigmoid": dpo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, 0.7)[0],
        "length_normalized": length_normalized_dpo_loss(
            p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.chosen_lengths, p.rejected_lengths, 0.7
        )[0],
        "simpo": simpo_loss(p.chosen / p.chosen_lengths, p.rejected / p.rejected_lengths, 0.7, 0.3)[0],
        "ipo": ipo_loss(p.chosen, p.rejected, p.ref_chosen, p.ref_rejected, p.chosen_lengths, p.rejected_lengths, 0.7)[
            0
        ],
    }
    values = {name: LOSSES[name](p, cfg)[0].item() for name in LOSS_TYPES}
    assert len(set(values.values())) == 4  # four different losses
    for name in LOSS_TYPES:
        assert values[name] == pytest.approx(expected[name].item())


# ---- configuration -------------------------------------------------------------------------------------------------


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match=r"^beta: must be in \[0.001, 100.0\], got -1"):
        DPOConfig(beta=-1)
    with pytest.raises(ConfigError, match=r"^loss_type: must be one of sigmoid, length_normalized, simpo, ipo"):
        DPOConfig(loss_type="hinge")
    with pytest.raises(ConfigError, match="^label_smoothing:"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="^task:"):
        DPOConfig(task="arith")


def test_beta_default_follows_the_loss_type():
    assert [DPOConfig(loss_type=name).beta for name in LOSS_TYPES] == [0.1, 5.0, 2.0, 0.5]
    assert DPOConfig(loss_type="simpo", beta=0.3).beta == 0.3


# ---- the bandit: convergence to the closed-form optimum --------------------------------------------------------------


@pytest.fixture(scope="module")
def bandit_setup():
    """The built-in bandit policy, 8,000 Bradley–Terry pairs drawn from it, and its exact log-probs.

    8,000 pairs rather than the task's 2,000: the fitted rewards carry sampling noise, and with 2,000 pairs that
    noise alone keeps KL(π*‖π_θ) near 9% of its start at β = 0.5; with 8,000 it is about 4%.
    """
    from lab.tasks import bandit
    from lab.tasks.base import load_builtin

    torch.set_num_threads(1)  # a 2-layer model: threads only add overhead
    model, tokenizer = load_builtin("bandit")
    rows = bandit.make_preference_rows(8000, seed=0, model=model, tokenizer=tokenizer)
    prompts = bandit.PROMPTS
    index = {
        "prompt": t([prompts.index(r["prompt"]) for r in rows]),
        "chosen": t([tokenizer.convert_tokens_to_ids(r["chosen"]) for r in rows]),
        "rejected": t([tokenizer.convert_tokens_to_ids(r["rejected"]) for r in rows]),
    }
    with torch.no_grad():
        ref_logprobs = bandit.next_token_logprobs(model, tokenizer, prompts)  # (6, V)
    return model, tokenizer, rows, index, ref_logprobs, bandit.reward_tables(prompts, tokenizer)


def _fit(model, tokenizer, index, loss_fn, steps=60):
    """Full-batch SGD with momentum on all pairs, lr decaying linearly to 0; log π_θ(y|x) of every pair is read
    from one forward pass over the 6 prompts. (Adam's per-parameter step sizes make it overshoot and wander in
    directions the pairwise loss does not see; plain momentum SGD descends smoothly.)"""
    import copy

    from lab.tasks import bandit

    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.3, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    for _ in range(steps):
        logprobs = bandit.next_token_logprobs(policy, tokenizer, bandit.PROMPTS)  # (6, V)
        chosen = logprobs[index["prompt"], index["chosen"]]  # (N,)
        rejected = logprobs[index["prompt"], index["rejected"]]  # (N,)
        loss, _ = loss_fn(chosen, rejected, index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return policy.eval()


def test_bandit_pair_logprobs_are_the_next_token_logprobs(bandit_setup):
    """The trainer's batch path (encode_preference_batch + pair_logprobs, no eos on bandit) scores a bandit pair
    with exactly the next-token log-prob the convergence tests below use."""

    model, tokenizer, rows, index, ref_logprobs, _ = bandit_setup
    batch = encode_preference_batch(tokenizer, rows[:16], max_length=64, add_eos=False)
    with torch.no_grad():
        chosen, rejected, chosen_lengths, rejected_lengths = pair_logprobs(model, batch)
    torch.testing.assert_close(chosen, ref_logprobs[index["prompt"][:16], index["chosen"][:16]])
    torch.testing.assert_close(rejected, ref_logprobs[index["prompt"][:16], index["rejected"][:16]])
    assert chosen_lengths.tolist() == [1.0] * 16 and rejected_lengths.tolist() == [1.0] * 16


def test_dpo_reaches_the_kl_regularized_optimum_on_bandit(bandit_setup):
    """DPO with β on Bradley–Terry pairs from π_ref moves π_θ to π* = π_ref·exp(r/β)/Z:
    KL(π*‖π_θ) ends ≤ 10% of its start (measured: 0.278 → 0.008, 3%, at β = 0.5)."""
    from lab.tasks import bandit

    model, tokenizer, _, index, ref_logprobs, _ = bandit_setup
    beta = 0.5
    start = bandit.kl_to_optimum(model, tokenizer, beta, ref_logprobs)
    ref_w = ref_logprobs[index["prompt"], index["chosen"]]
    ref_l = ref_logprobs[index["prompt"], index["rejected"]]
    policy = _fit(model, tokenizer, index, lambda c, r, _: dpo_loss(c, r, ref_w, ref_l, beta))
    end = bandit.kl_to_optimum(policy, tokenizer, beta, ref_logprobs)
    assert start > 0.2
    assert end <= 0.1 * start, (start, end)


def test_simpo_fits_softmax_of_reward_over_beta_and_ignores_the_reference(bandit_setup):
    """SimPO with γ = 0 on single-token answers is the Bradley–Terry fit β log π_θ(y) = r(y) + c(x): among the
    answers that appear in the data π_θ → softmax(r/β), whatever π_ref was. The mass on tokens that never
    appear in a pair is not constrained by the loss at all (it drifts), so we compare the distribution
    renormalized over the answers.

    Measured at β = 0.5: KL(softmax(r/β) ‖ π_θ|answers) 0.70 → 0.008 (≤ 10% asserted); KL(π* ‖ π_θ|answers)
    goes from 0.28 to 0.12, still 44% of its start, because the built-in π_ref (e.g. 0.45 on "blue", 0.10 on
    "red") is far from uniform and SimPO never sees it: it does NOT approach π* (DPO above gets to 3%).
    """
    from lab.tasks import bandit

    model, tokenizer, _, index, ref_logprobs, rewards = bandit_setup
    beta = 0.5
    answers = rewards > bandit.NON_ANSWER_REWARD  # (6, V) the tokens that can appear in a pair
    minus_inf = torch.tensor(-math.inf)

    def on_answers(logprobs):  # renormalize over the answers: (6, V) log-probs, −inf elsewhere
        return torch.where(answers, logprobs, minus_inf).log_softmax(-1)

    target = on_answers(rewards / beta)  # softmax(r/β) over the answers
    star = on_answers(bandit.pi_star(ref_logprobs, rewards, beta))  # π* over the answers

    def distances(policy):
        with torch.no_grad():
            logprobs = on_answers(bandit.next_token_logprobs(policy, tokenizer, bandit.PROMPTS))
        return bandit.kl(target, logprobs).mean().item(), bandit.kl(star, logprobs).mean().item()

    start_target, start_star = distances(model)
    policy = _fit(model, tokenizer, index, lambda c, r, _: simpo_loss(c, r, beta, gamma=0.0))
    end_target, end_star = distances(policy)
    assert end_target <= 0.1 * start_target, (start_target, end_target)
    assert end_star >= 0.25 * start_star, (start_star, end_star)  # far from π*: 2.5× DPO's 10% criterion


# ---- metrics --------------------------------------------------------------------------------------------------------


def test_sampled_kl_is_the_exact_kl_on_bandit(bandit_setup):
    """kl/ref's k1 estimate over sampled completions matches the exact KL(π_θ‖π_ref) over the vocabulary
    (bandit: one-token completions), within 4 standard errors."""
    from types import SimpleNamespace

    from lab.tasks import bandit

    model, tokenizer, _, index, ref_logprobs, _ = bandit_setup
    ref_w = ref_logprobs[index["prompt"], index["chosen"]]
    ref_l = ref_logprobs[index["prompt"], index["rejected"]]
    trained = _fit(model, tokenizer, index, lambda c, r, _: dpo_loss(c, r, ref_w, ref_l, 0.5), steps=5)
    with torch.no_grad():
        exact = bandit.kl(bandit.next_token_logprobs(trained, tokenizer, bandit.PROMPTS), ref_logprobs).mean().item()

    @contextmanager
    def reference():
        yield model

    policy = SimpleNamespace(model=trained, tokenizer=tokenizer, reference=reference)
    roll = sample_heldout(policy, bandit.PROMPTS, max_new_tokens=1, samples=500, seed=0)
    estimate = sampled_kl(policy, roll)
    with torch.no_grad():
        from lab.ops import completion_token_logprobs

        T = roll.completion_ids.shape[1]
        per = (
            completion_token_logprobs(trained, roll.input_ids, roll.attention_mask, T)
            - completion_token_logprobs(model, roll.input_ids, roll.attention_mask, T)
        ).sum(-1)
    stderr = per.std().item() / math.sqrt(len(per))
    assert exact > 0.02
    assert abs(estimate - exact) < 4 * stderr + 1e-6, (estimate, exact, stderr)


# ---- runs -----------------------------------------------------------------------------------------------------------


def _read(run_path):
    metrics = [json.loads(line) for line in open(run_path / "metrics.jsonl")]
    status = json.loads((run_path / "status.json").read_text())
    return metrics, status


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_few_steps_change_the_adapter_and_write_the_record(tmp_path, loss_type):
    from lab.modeling import load_policy

    policy = load_policy(task="reviews", mode="lora", lora_r=4, lora_alpha=8)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    cfg = DPOConfig(
        task="reviews",
        loss_type=loss_type,
        steps=2,
        batch_size=4,
        eval_size=2,
        kl_samples=2,
        out=str(tmp_path),
        run_id="r",
        lr=1e-2,
    )
    rows = list(train(cfg, policy=policy))
    assert [r["step"] for r in rows] == [1, 2]
    changed = [n for n, p in policy.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    metrics, status = _read(tmp_path / "r")
    assert status["status"] == "completed" and len(metrics) == 2
    for key in (
        "loss/dpo",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logprobs/chosen",
        "logprobs/rejected",
        "grad/norm",
    ):
        assert key in metrics[0], key
    assert "eval/gold_reward" in metrics[-1] and "eval/sample_reward" in metrics[-1]
    assert ("kl/ref" in metrics[-1]) == USES_REFERENCE[loss_type]
    assert "gold_reward" in json.dumps(status["summary"]["before"])
    assert (tmp_path / "r" / "checkpoints" / "final" / "adapter_config.json").exists()


def test_simpo_never_touches_the_reference(tmp_path):
    """SimPO has no π_ref: a policy whose reference() raises still trains (full mode), and no frozen copy exists."""
    from lab.dpo import _load_policy
    from lab.tasks import get_task

    cfg = DPOConfig(task="bandit", loss_type="simpo", mode="full", steps=2, batch_size=8, out=str(tmp_path), run_id="s")
    policy = _load_policy(cfg, get_task("bandit"))
    assert policy._ref_model is None

    @contextmanager
    def no_reference():
        raise AssertionError("SimPO must not use the reference policy")
        yield

    policy.reference = no_reference
    rows = list(train(cfg, policy=policy))
    assert len(rows) == 2 and "kl/ref" not in rows[-1] and "eval/kl_to_optimum" not in rows[-1]


def test_bandit_run_reports_exact_heldout_metrics(tmp_path):
    """On bandit, kl/ref and eval/kl_to_optimum are exact: they equal bandit.kl and bandit.kl_to_optimum."""
    from lab.modeling import load_policy
    from lab.tasks import bandit

    policy = load_policy(task="bandit", mode="lora", lora_r=4, lora_alpha=8)
    cfg = DPOConfig(task="bandit", beta=0.5, steps=3, batch_size=64, lr=2e-2, out=str(tmp_path), run_id="b")
    last = list(train(cfg, policy=policy))[-1]
    with torch.no_grad(), policy.reference() as ref:
        ref_logprobs = bandit.next_token_logprobs(ref, policy.tokenizer, bandit.PROMPTS)
    with torch.no_grad():
        logprobs = bandit.next_token_logprobs(policy.model, policy.tokenizer, bandit.PROMPTS)
    assert last["kl/ref"] == pytest.approx(bandit.kl(logprobs, ref_logprobs).mean().item(), rel=1e-4)
    assert last["kl/ref"] > 0
    assert last["eval/kl_to_optimum"] == pytest.approx(
        bandit.kl_to_optimum(policy.model, policy.tokenizer, 0.5, ref_logprobs), rel=1e-4
    )
    rewards = bandit.reward_tables(bandit.PROMPTS, policy.tokenizer)
    assert "eval/sample_reward" not in last  # on bandit the expected reward is exact, under its own name
    assert last["eval/exact_reward"] == pytest.approx(bandit.expected_reward(logprobs, rewards).mean().item(), rel=1e-4)


def test_cli_run_in_a_subprocess(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab",
            "train",
            "dpo",
            "--task",
            "reviews",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--eval-size",
            "2",
            "--kl-samples",
            "2",
            "--out",
            str(tmp_path),
            "--run-id",
            "cli",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics, status = _read(tmp_path / "cli")
    assert status["status"] == "completed" and [m["step"] for m in metrics] == [1, 2]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--beta", "-1"], "error: beta: must be in [0.001, 100.0], got -1.0"),
        (
            ["--loss-type", "hinge"],
            "error: loss_type: must be one of sigmoid, length_normalized, simpo, ipo, got 'hinge'",
        ),
    ],
)
def test_cli_bad_hyperparameter_is_one_line(tmp_path, capsys, flags, message):
    from lab.cli import main

    assert main(["train", "dpo", *flags, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not any(tmp_path.iterdir())  # no run was started


def test_sampled_off_support_hand_computed():
    """Prompt a has support {x, y}: samples x, z, " y " → 1 of 3 off (whitespace ignored). Prompt b is in no pair,
    so its samples are not counted; prompt c's sample w is off: 2 of 4 = 0.5. No prompt in the pairs → None."""
    from lab.evaluate import sampled_off_support
    from lab.tasks.enumerable import pair_support

    support = pair_support(
        [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "c", "chosen": "v", "rejected": "u"}]
    )
    assert support == {"a": {"x", "y"}, "c": {"v", "u"}}
    prompts, completions = ["a", "a", "a", "b", "c"], ["x", "z", " y ", "q", "w"]
    assert sampled_off_support(prompts, completions, support) == pytest.approx(0.5)
    assert sampled_off_support(["b"], ["q"], support) is None


def test_bandit_run_logs_the_exact_mass_off_the_pairs(tmp_path):
    """eval/mass_off_support on bandit is 1 − Σ π_θ(y|x) over the tokens in the training pairs of x, averaged over
    the prompts, before and after; eval/kl_to_optimum_support ≤ eval/kl_to_optimum here (π_ref puts ~0.1% off)."""
    from lab.modeling import load_policy
    from lab.tasks import bandit, get_task
    from lab.tasks.enumerable import pair_support, support_mask

    policy = load_policy(task="bandit", mode="lora", lora_r=4, lora_alpha=8)
    cfg = DPOConfig(
        task="bandit", beta=0.5, steps=2, batch_size=64, lr=2e-2, out=str(tmp_path), run_id="m", sample_every=0
    )
    last = list(train(cfg, policy=policy))[-1]
    mask = support_mask(bandit.PROMPTS, pair_support(get_task("bandit").preference_rows("train")), policy.tokenizer)
    with torch.no_grad():
        probs = bandit.next_token_logprobs(policy.model, policy.tokenizer, bandit.PROMPTS).exp()  # (6, V)
    assert last["eval/mass_off_support"] == pytest.approx(1 - (probs * mask).sum(-1).mean().item(), abs=1e-5)
    assert 0 < last["eval/mass_off_support"] < 0.05
    assert 0 <= last["eval/kl_to_optimum_support"] <= last["eval/kl_to_optimum"] + 1e-3
    _, status = _read(tmp_path / "m")
    assert "eval/mass_off_support" in status["summary"]["before"]


def test_dpo_logs_kl_ref_every_step_from_fresh_samples(tmp_path):
    """With the default kl_every = 1, DPO logs kl/ref at every step: k1 per completion over fresh samples of π_θ
    on held-out prompts (not over the pairs: those are not π_θ's samples), taken before the step's update. A fresh
    LoRA adapter (B = 0) is π_ref, so step 1 reads 0; later steps read the moved policy's KL. The last step is an
    evaluation and logs the held-out estimate instead."""
    from lab.modeling import load_policy

    policy = load_policy(task="reviews", mode="lora", lora_r=4, lora_alpha=8)
    cfg = DPOConfig(
        task="reviews",
        steps=3,
        batch_size=4,
        eval_size=2,
        kl_samples=2,
        kl_prompts=4,
        sample_every=0,
        out=str(tmp_path),
        run_id="k",
        lr=3e-2,
    )
    assert cfg.kl_every == 1
    rows = list(train(cfg, policy=policy))
    assert all("kl/ref" in r for r in rows)
    assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl/ref"] != pytest.approx(0.0, abs=1e-6)


def test_dpo_step_kl_on_bandit_is_the_exact_kl(tmp_path):
    """On bandit the per-step kl/ref is exact: 0 at step 1, and at step 2 it equals bandit.kl of the policy after
    step 1's update (measured while the run waits between the two steps), > 0."""
    from lab.evaluate import step_kl
    from lab.modeling import load_policy
    from lab.tasks import bandit, get_task

    policy = load_policy(task="bandit", mode="lora", lora_r=4, lora_alpha=8)
    cfg = DPOConfig(
        task="bandit", beta=0.5, steps=3, batch_size=64, lr=2e-2, sample_every=0, out=str(tmp_path), run_id="b"
    )
    steps = train(cfg, policy=policy)
    first = next(steps)
    assert first["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad(), policy.reference() as ref:
        ref_logprobs = bandit.next_token_logprobs(ref, policy.tokenizer, bandit.PROMPTS)
    with torch.no_grad():
        exact = (
            bandit.kl(bandit.next_token_logprobs(policy.model, policy.tokenizer, bandit.PROMPTS), ref_logprobs)
            .mean()
            .item()
        )
    assert step_kl(policy, get_task("bandit"), cfg, None, seed=0) == pytest.approx(exact, rel=1e-5)
    second = next(steps)  # its kl/ref is taken before its update: the policy measured above
    assert second["kl/ref"] == pytest.approx(exact, rel=1e-4) and exact > 0
    list(steps)


def test_simpo_logs_no_kl_ref_between_evaluations(tmp_path):
    """SimPO has no π_ref, so kl_every finds nothing to compare against: no kl/ref at any step."""
    cfg = DPOConfig(
        task="bandit", loss_type="simpo", steps=2, batch_size=8, sample_every=0, out=str(tmp_path), run_id="s"
    )
    assert not any("kl/ref" in r for r in train(cfg))


def test_is_eval_step_hand_computed():
    """steps 10, eval_every 4: steps 4, 8 and the last, 10; eval_every 0: the last only."""
    from types import SimpleNamespace

    from lab.preference import is_eval_step

    cfg = SimpleNamespace(steps=10, eval_every=4)
    assert [s for s in range(1, 11) if is_eval_step(cfg, s)] == [4, 8, 10]
    cfg.eval_every = 0
    assert [s for s in range(1, 11) if is_eval_step(cfg, s)] == [10]


def test_heldout_metrics_on_bandit_are_exact_and_named_once():
    """At π_θ = π_ref (a fresh LoRA adapter): eval/exact_reward = E_{π_ref}[r], kl/ref = 0 and eval/kl_to_optimum =
    KL(π*‖π_ref), all exact; no eval/sample_reward on an enumerable task, and without the reference neither kl/ref
    nor eval/kl_to_optimum."""
    from lab.evaluate import heldout_metrics
    from lab.modeling import load_policy
    from lab.tasks import bandit, get_task

    policy = load_policy(task="bandit", mode="lora", lora_r=4, lora_alpha=8)
    task = get_task("bandit")
    with torch.no_grad():
        logprobs = bandit.next_token_logprobs(policy.model, policy.tokenizer, bandit.PROMPTS)
    rewards = bandit.reward_tables(bandit.PROMPTS, policy.tokenizer)
    full = heldout_metrics(policy, task, 8, 0.5, kl_ref=True, samples=4)
    assert {"eval/gold_reward", "eval/exact_reward", "eval/kl_to_optimum", "kl/ref"} <= set(full)
    assert "eval/sample_reward" not in full and "eval/accuracy" not in full
    assert full["eval/exact_reward"] == pytest.approx(bandit.expected_reward(logprobs, rewards).mean().item(), rel=1e-5)
    assert full["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    star = bandit.pi_star(logprobs, rewards, 0.5)
    assert full["eval/kl_to_optimum"] == pytest.approx(bandit.kl(star, logprobs).mean().item(), rel=1e-4)
    plain = heldout_metrics(policy, task, 8, 0.5)
    assert {"eval/gold_reward", "eval/exact_reward"} <= set(plain)
    assert "kl/ref" not in plain and "eval/kl_to_optimum" not in plain
