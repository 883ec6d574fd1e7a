"""Diversity and calibration diagnostics (lab/diagnostics.py): hand-computed values, identities, and the hooks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from lab.diagnostics import (
    answer_confidences,
    calibration_metrics,
    completion_token_lists,
    distinct_n,
    diversity_metrics,
    ece_from_bins,
    exact_calibration_bins,
    expected_calibration_error,
    per_prompt_entropy,
    reliability_bins,
    reliability_figure,
    string_entropy,
)
from lab.sampling import Rollout

ROOT = Path(__file__).resolve().parents[1]


def _rollout() -> Rollout:
    """Two samples of one prompt: [5, 6, eos] finished, [5, 7, 8, 9] truncated (no eos)."""
    return Rollout(
        prompts=["p", "p"],
        completions=["a b", "a c d e"],
        prompt_ids=torch.tensor([[3], [3]]),
        prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=torch.tensor([[5, 6, 1, 0], [5, 7, 8, 9]]),
        completion_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        truncated=torch.tensor([False, True]),
    )


# ----------------------------------------------------------------------------------------------------------------------
# diversity


def test_distinct_n_by_hand():
    """[1 2 3], [1 2 4]: unigrams 1 2 3 1 2 4 → 4 distinct of 6; bigrams (1 2) (2 3) (1 2) (2 4) → 3 of 4.
    [1 2], [3]: the only bigram is (1 2); (2 3) would cross from one sequence into the next."""
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_n([[1, 2], [3]], 2) == 1.0
    assert distinct_n([[1, 1, 1, 1]], 2) == pytest.approx(1 / 3)
    assert distinct_n([[5], []], 2) is None  # no bigram at all: undefined, not 0


def test_string_entropy_by_hand():
    """a a b c: −(½ ln ½ + 2 · ¼ ln ¼) = ½ ln 2 + ½ ln 4 = 1.5 ln 2; all equal → 0; k distinct → ln k."""
    assert string_entropy(["a", "a", "b", "c"]) == pytest.approx(1.5 * math.log(2))
    assert string_entropy(["x"] * 5) == 0.0
    assert string_entropy(["a", "b", "c", "d"]) == pytest.approx(math.log(4))


def test_per_prompt_entropy_skips_single_samples():
    """x: {a, b} → ln 2; y: {c, c} → 0; z has one sample and is skipped: mean (ln 2 + 0)/2."""
    prompts = ["x", "x", "y", "y", "z"]
    assert per_prompt_entropy(prompts, ["a", "b", "c", "c", "d"]) == pytest.approx(math.log(2) / 2)
    assert per_prompt_entropy(["x", "y"], ["a", "b"]) is None


def test_diversity_metrics_of_a_rollout_by_hand():
    """Tokens without eos: [5 6] (finished: its eos dropped) and [5 7 8 9] (truncated: all kept). Unigrams
    5 6 5 7 8 9 → 5/6; bigrams (5 6) (5 7) (7 8) (8 9) → 4/4; one prompt with two different strings → ln 2."""
    roll = _rollout()
    assert completion_token_lists(roll) == [[5, 6], [5, 7, 8, 9]]
    metrics = diversity_metrics(roll)
    assert metrics["diversity/distinct_1"] == pytest.approx(5 / 6)
    assert metrics["diversity/distinct_2"] == pytest.approx(1.0)
    assert metrics["diversity/entropy"] == pytest.approx(math.log(2))


def test_rollout_metrics_carry_the_diversity_metrics():
    from lab.rollout import rollout_metrics

    metrics = rollout_metrics(_rollout(), torch.tensor([1.0, 0.0]))
    assert metrics["diversity/distinct_1"] == pytest.approx(5 / 6)
    assert metrics["diversity/entropy"] == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------------------------------------------------
# calibration


def test_ece_is_zero_when_perfectly_calibrated():
    """Four answers at 0.25 with one right, four at 0.75 with three right: every bin's accuracy is its confidence."""
    confidences = torch.tensor([0.25] * 4 + [0.75] * 4, dtype=torch.float64)
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert expected_calibration_error(confidences, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_one_when_all_confident_and_all_wrong():
    assert expected_calibration_error(torch.ones(5), torch.zeros(5, dtype=torch.bool)) == pytest.approx(1.0)


def test_ece_mixed_case_by_hand():
    """M = 10. 0.9, 0.9 (one right) in (0.8, 0.9]: |0.5 − 0.9| · 2/4 = 0.2; 0.6 (right) in (0.5, 0.6]:
    |1 − 0.6| · 1/4 = 0.1; 0.2 (wrong) in (0.1, 0.2]: |0 − 0.2| · 1/4 = 0.05. ECE = 0.35."""
    confidences = torch.tensor([0.9, 0.9, 0.6, 0.2], dtype=torch.float64)
    correct = torch.tensor([True, False, True, False])
    assert expected_calibration_error(confidences, correct) == pytest.approx(0.35)
    bins = reliability_bins(confidences, correct)
    assert [b["count"] for b in bins] == [0, 1, 0, 0, 0, 1, 0, 0, 2, 0]
    assert bins[8]["confidence"] == pytest.approx(0.9) and bins[8]["accuracy"] == pytest.approx(0.5)
    assert bins[0]["confidence"] is None and sum(b["weight"] for b in bins) == pytest.approx(1.0)
    # two bins: [0, .5] holds 0.2 (acc 0), (.5, 1] holds .9 .9 .6 (conf .8, acc 2/3): ¼·.2 + ¾·(.8 − 2/3) = 0.15
    assert expected_calibration_error(confidences, correct, n_bins=2) == pytest.approx(0.15)


def test_bin_edges_are_closed_on_the_right():
    """0 and 0.1 fall in B_1 = [0, 0.1]; 1 falls in the last bin (0.9, 1]."""
    bins = reliability_bins(torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64), torch.tensor([1, 1, 1]))
    assert bins[0]["count"] == 2 and bins[9]["count"] == 1


def test_exact_calibration_against_a_target_by_hand():
    """π_θ = (0.8, 0.2), π* = (0.5, 0.5): the pair at 0.8 weighs 0.8 and misses by 0.3, the pair at 0.2 weighs 0.2
    and misses by 0.3: ECE = 0.8 · 0.3 + 0.2 · 0.3 = 0.3. Against itself: 0."""
    logprobs = torch.tensor([[0.8, 0.2]]).log()
    target = torch.tensor([[0.5, 0.5]]).log()
    assert ece_from_bins(exact_calibration_bins(logprobs, target)) == pytest.approx(0.3, abs=1e-6)
    assert ece_from_bins(exact_calibration_bins(logprobs, logprobs)) == pytest.approx(0.0, abs=1e-9)


def test_exact_calibration_is_the_limit_of_sampled_ece():
    """Sample y ~ π_θ and 'correct' ~ Bernoulli(π*(y)): the sampled ECE approaches the exact one."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.55, 0.3, 0.15], dtype=torch.float64)
    target = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    y = torch.multinomial(p, 200_000, replacement=True, generator=gen)  # (N,)
    correct = torch.rand(len(y), generator=gen, dtype=torch.float64) < target[y]
    sampled = expected_calibration_error(p[y], correct)
    exact = ece_from_bins(exact_calibration_bins(p.log()[None], target.log()[None]))
    assert exact == pytest.approx(0.55 * 0.35 + 0.3 * 0.2 + 0.15 * 0.15)
    assert sampled == pytest.approx(exact, abs=0.01)


def test_reliability_figure_plots_each_policy():
    bins = reliability_bins(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))
    fig = reliability_figure([("before", bins), ("after", bins)])
    assert [t.name for t in fig.data] == ["calibrated", "before", "after"]
    assert list(fig.data[1].x) == pytest.approx([0.2, 0.9])
    assert "ECE" in fig.layout.title.text


def test_answer_confidences_match_a_naive_forward_pass():
    """π(y|x) of each greedy answer, eos included, equals exp Σ log_softmax(model(x + y)) gathered at y."""
    from lab.modeling import load_policy
    from lab.sampling import encode_prompt, generate
    from lab.tasks import get_task

    task = get_task("arith")
    policy = load_policy(task.model, mode="full")
    policy.model.eval()
    prompts = task.eval_prompts()[:3]
    confidences, correct = answer_confidences(policy.model, policy.tokenizer, task, prompts)
    roll = generate(policy.model, policy.tokenizer, prompts, task.max_new_tokens, greedy=True)
    for i, prompt in enumerate(prompts):
        x = encode_prompt(policy.tokenizer, prompt)
        y = roll.completion_ids[i][roll.completion_mask[i].bool()].tolist()
        with torch.no_grad():
            logits = policy.model(torch.tensor([x + y])).logits[0, :-1].log_softmax(-1)  # (L-1, V)
        naive = logits[len(x) - 1 :].gather(-1, torch.tensor(y)[:, None]).sum().exp()
        assert float(confidences[i]) == pytest.approx(float(naive), rel=1e-4)
    gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
    assert correct.tolist() == [g >= 1.0 for g in gold]
    metrics = calibration_metrics(policy, task, n=16)
    assert set(metrics) == {"eval/ece"} and 0.0 <= metrics["eval/ece"] <= 1.0


def test_bandit_ece_to_optimum_vanishes_as_pi_star_nears_the_policy():
    """With π_ref = π_θ and a large β, π* ≈ π_θ: ECE ≈ 0; at a small β π* is sharper than π_θ: ECE > 0."""
    from lab.modeling import load_policy
    from lab.tasks import get_task
    from lab.tasks.enumerable import next_token_logprobs

    task = get_task("bandit")
    policy = load_policy(task.model, mode="full")
    with torch.no_grad():
        own = next_token_logprobs(policy.model, policy.tokenizer, task.eval_prompts())  # (B, V)
    assert calibration_metrics(policy, task, 6, beta=1e6, ref_logprobs=own)["eval/ece_to_optimum"] < 1e-4
    assert calibration_metrics(policy, task, 6, beta=0.1, ref_logprobs=own)["eval/ece_to_optimum"] > 0.05
    assert calibration_metrics(policy, task, 6) == {}  # no β: no π*


def test_window_means_skip_missing_values():
    """Steps 1–3 of a (step, value) log where step 2 lacks the metric: mean of 1.0 and 3.0 = 2.0."""
    from lab.diagnostics import window_means

    rows = [{"step": 1, "a": 1.0}, {"step": 2}, {"step": 3, "a": 3.0}, {"step": 4, "a": 10.0}]
    assert window_means(rows, ["a", "b"], range(1, 4)) == {"a": 2.0, "b": None}


# ----------------------------------------------------------------------------------------------------------------------
# names


NEW_METRICS = [
    "diversity/distinct_1",
    "diversity/distinct_2",
    "diversity/entropy",
    "eval/ece",
    "eval/ece_to_optimum",
]


def test_every_diagnostic_metric_is_in_the_readme_glossary():
    """The names the diagnostics log, as the README's glossary spells them."""
    glossary = (ROOT / "README.md").read_text().split("## Glossary of logged metrics", 1)[1]
    documented = set(re.findall(r"`([a-z_]+/[a-z_0-9]+)`", glossary))
    logged = set(diversity_metrics(_rollout())) | {"eval/ece", "eval/ece_to_optimum"}
    assert logged == set(NEW_METRICS)
    assert logged <= documented, sorted(logged - documented)


def test_the_diagnostics_command_reads_runs_by_id_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    """Early steps 1–2 and the final 2 of a 4-step record: reward 0, 1 | 2, 3 → means 0.5 → 2.5 (hand-computed)."""
    from lab.diagnostics import main
    from lab.records import RunRecord

    record = RunRecord.create(out=str(tmp_path), run_id="r", config={"method": "grpo"})
    for step in range(1, 5):
        record.log_metrics(step, {"step": step, "reward/mean": float(step - 1)})
    record.finish("completed")
    assert main(["r", "--out", str(tmp_path), "--early", "1", "2", "--final", "2", "--metrics", "reward/mean"]) == 0
    assert "| r | 0.500 → 2.500 |" in capsys.readouterr().out
    assert main(["nope", "--out", str(tmp_path)]) == 2
    assert "no run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["r", "--out", str(tmp_path), "--metrics", "nope"])
    assert "nope logged by none" in capsys.readouterr().err
