"""Diversity and calibration of a policy: the two things the seed says RLHF trades away.

"Pushing PPO too far degrades text quality (mode collapse, loss of diversity)", and "RLHF at temperature 1 shows
much more overconfident behavior". Both are measured here, as pure functions of samples and probabilities, plus
the few helpers that draw those samples from a policy.

Diversity of a set of completions (``diversity/*``)::

    distinct-n   = #distinct n-grams / #n-grams                   over all completions together (Li et al. 2016)
    entropy      = mean over prompts x of  − Σ_s (c_s/k) log(c_s/k)          (nats)

n-grams are of token ids, inside one completion (none crosses from one completion to the next; eos not
counted). The entropy is the plug-in ("empirical") entropy of the completion strings among the k ≥ 2 samples of
one prompt, c_s the count of string s: 0 when all k samples are the same string, log k when all differ. It
estimates the entropy of π(·|x) over whole completions, with a downward bias that is large once that entropy
exceeds log k: compare it between runs with the same k, not with token-level ``entropy``.

Calibration of answer probabilities (``eval/ece``): the policy's confidence in an answer y is the probability
it gives that whole answer, p = π_θ(y|x) = exp Σ_t log π_θ(y_t|x, y_<t) (eos included, temperature 1). With the
answers' confidences split into M equal-width bins B_1..B_M of [0, 1] (B_1 = [0, 1/M], B_m = ((m−1)/M, m/M])::

    ECE = Σ_m (|B_m| / N) · | acc(B_m) − conf(B_m) |        (Guo et al. 2017; Naeini et al. 2015)

acc the share of correct answers in the bin, conf their mean confidence. 0 is perfect calibration; an
overconfident model has conf > acc in its top bins. On an enumerable task (``bandit``) the same comparison is
exact against π* instead of against sampled correctness: ``eval/ece_to_optimum`` (``exact_calibration_bins``).

==============================  ================================================
symbol                          code
==============================  ================================================
p = π_θ(y|x)                    ``confidences`` (N,)
1[y correct]                    ``correct`` (N,) bool
M                               ``n_bins``
c_s / k                         ``string_entropy``
==============================  ================================================
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from lab.ops import completion_token_logprobs, masked_sum
from lab.sampling import Rollout, generate

# ----------------------------------------------------------------------------------------------------------------------
# Diversity


def distinct_n(sequences: list[list], n: int) -> float | None:
    """#distinct n-grams / #n-grams over all ``sequences`` (lists of tokens), n-grams inside one sequence only.

    None when no sequence has n tokens (the ratio is undefined). Naive equivalent: collect every
    ``tuple(s[i:i+n])`` in a list and divide ``len(set(list))`` by ``len(list)``."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def string_entropy(samples: list[str]) -> float:
    """− Σ_s (c_s/k) log(c_s/k): plug-in entropy (nats) of the empirical distribution of k samples."""
    k = len(samples)
    return -sum(c / k * math.log(c / k) for c in Counter(samples).values())


def per_prompt_entropy(prompts: list, completions: list[str]) -> float | None:
    """Mean over distinct prompts with ≥ 2 samples of ``string_entropy`` of their completions; None when no prompt
    has two samples (one sample says nothing about a distribution)."""
    groups: dict[str, list[str]] = {}
    for prompt, completion in zip(prompts, completions):
        groups.setdefault(repr(prompt), []).append(completion)
    values = [string_entropy(group) for group in groups.values() if len(group) >= 2]
    return sum(values) / len(values) if values else None


def completion_token_lists(roll: Rollout) -> list[list[int]]:
    """Each completion's token ids, eos left out (it ends every finished completion and would count as an n-gram)."""
    lengths = roll.completion_mask.sum(-1) - (~roll.truncated).long().to(roll.completion_mask.device)  # (B,)
    return [ids[: int(length)].tolist() for ids, length in zip(roll.completion_ids, lengths)]


@torch.no_grad()
def diversity_metrics(roll: Rollout) -> dict:
    """``diversity/distinct_1``, ``diversity/distinct_2`` over the rollout's completions together, and
    ``diversity/entropy`` over its prompts with ≥ 2 samples (see the module docstring); a metric whose value is
    undefined on this rollout is left out."""
    tokens = completion_token_lists(roll)
    values = {
        "diversity/distinct_1": distinct_n(tokens, 1),
        "diversity/distinct_2": distinct_n(tokens, 2),
        "diversity/entropy": per_prompt_entropy(roll.prompts, roll.completions),
    }
    return {name: value for name, value in values.items() if value is not None}


# ----------------------------------------------------------------------------------------------------------------------
# Calibration


def _bin_index(confidences: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin m (0-based) of each confidence: B_1 = [0, 1/M], B_m = ((m−1)/M, m/M]. (N,) long."""
    return (torch.ceil(confidences.double() * n_bins).long() - 1).clamp(0, n_bins - 1)


def reliability_bins(
    confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 10, weights: torch.Tensor | None = None
) -> list[dict]:
    """The reliability diagram's data: one dict per equal-width bin, ``{lo, hi, count, weight, confidence,
    accuracy}`` (``confidence``, ``accuracy`` None in an empty bin). ``weight`` is the bin's share of the total
    weight (of the N answers, each weighing 1 unless ``weights`` say otherwise); ``correct`` may be fractional
    (a probability of being right). confidences, correct, weights: (N,)."""
    if not n_bins >= 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
    confidences = confidences.detach().double().flatten().cpu()  # (N,)
    correct = correct.detach().double().flatten().cpu()  # (N,)
    w = torch.ones_like(confidences) if weights is None else weights.detach().double().flatten().cpu()  # (N,)
    index = _bin_index(confidences, n_bins)  # (N,)
    total = float(w.sum())
    bins = []
    for m in range(n_bins):
        inside = index == m  # (N,)
        weight = float(w[inside].sum())
        bins.append(
            {
                "lo": m / n_bins,
                "hi": (m + 1) / n_bins,
                "count": int(inside.sum()),
                "weight": weight / total if total > 0 else 0.0,
                "confidence": float((w * confidences)[inside].sum()) / weight if weight > 0 else None,
                "accuracy": float((w * correct)[inside].sum()) / weight if weight > 0 else None,
            }
        )
    return bins


def ece_from_bins(bins: list[dict]) -> float:
    """Σ_m weight_m · |accuracy_m − confidence_m| over the non-empty bins of ``reliability_bins``."""
    return sum(b["weight"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["weight"] > 0)


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = Σ_m (|B_m|/N) · |acc(B_m) − conf(B_m)| with M equal-width bins of [0, 1] (see the module docstring).

    confidences: (N,) in [0, 1]; correct: (N,) bool or 0/1. Naive equivalent: loop over the bins, average
    the confidences and the correctness of the answers inside each, weight the gap by the bin's share."""
    return ece_from_bins(reliability_bins(confidences, correct, n_bins))


def exact_calibration_bins(logprobs: torch.Tensor, target_logprobs: torch.Tensor, n_bins: int = 10) -> list[dict]:
    """The reliability diagram of π_θ against a target policy (π*), exactly, on an enumerable task.

    Sampling y ~ π_θ(·|x) and asking how often the target would agree gives a reliability diagram whose
    "confidence" is π_θ(y|x) and whose "accuracy" is π*(y|x); summed over every (x, y) with weight π_θ(y|x)/B
    instead of sampled, each bin is exact: conf_m = Σ π_θ·π_θ / Σ π_θ and acc_m = Σ π_θ·π* / Σ π_θ over the pairs
    whose π_θ(y|x) falls in bin m. Its ``ece_from_bins`` is 0 when π_θ = π*; conf > acc means π_θ is more
    sure of its answers than the optimum is. logprobs, target_logprobs: (B, V)."""
    p = logprobs.detach().double().exp()  # (B, V)
    target = target_logprobs.detach().double().exp().to(p.device)  # (B, V)
    return reliability_bins(p.flatten(), target.flatten(), n_bins, weights=p.flatten())


@torch.no_grad()
def rollout_confidences(model, roll: Rollout, task) -> tuple[torch.Tensor, torch.Tensor]:
    """For answers already generated: the probability π_θ(y|x) the model gives each whole answer (temperature 1,
    eos included) and whether the task's gold reward calls it correct (≥ 1): (confidences (N,), correct (N,)
    bool), both on the CPU, scored in the chunks that fit in memory."""
    from lab.runner import auto_microbatch

    T = roll.completion_ids.shape[1]
    chunk = auto_microbatch(model, len(roll), T, context_tokens=roll.prompt_ids.shape[1])
    confidences = []
    for i in range(0, len(roll), chunk):
        part = roll.select(slice(i, i + chunk))
        logprobs = completion_token_logprobs(model, part.input_ids, part.attention_mask, T)  # (b, T)
        mask = part.completion_mask.to(logprobs.dtype)  # (b, T)
        confidences.append(masked_sum(logprobs.float(), mask.float(), dim=-1).exp().cpu())  # (b,)
    gold = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
    return torch.cat(confidences), torch.tensor([g >= 1.0 for g in gold])


@torch.no_grad()
def answer_confidences(model, tokenizer, task, prompts: list, max_new_tokens: int | None = None, rows: int = 64):
    """Greedy answers to ``prompts``, then ``rollout_confidences`` of them: (confidences (N,), correct (N,) bool).
    ``rows`` answers per generation."""
    confidences, correct = [], []
    for start in range(0, len(prompts), rows):
        roll = generate(
            model, tokenizer, prompts[start : start + rows], max_new_tokens or task.max_new_tokens, greedy=True
        )
        c, ok = rollout_confidences(model, roll, task)
        confidences.append(c)
        correct.append(ok)
    return torch.cat(confidences), torch.cat(correct)


@torch.no_grad()
def calibration_metrics(
    policy, task, n: int, beta: float | None = None, ref_logprobs: torch.Tensor | None = None, n_bins: int = 10
) -> dict:
    """``eval/ece`` of greedy answers on the first ``n`` held-out prompts of a verifiable task (the trainers take it
    from the answers their evaluation generated anyway: ``lab.evaluate.evaluate(calibrate=True)``); on an
    enumerable task, given β and π_ref's (B, V) next-token log-probs, the exact ``eval/ece_to_optimum`` of π_θ
    against π*; ``{}`` elsewhere."""
    if task is None:
        return {}
    was_training = policy.model.training
    policy.model.eval()
    try:
        if task.kind == "verifiable":
            confidences, correct = answer_confidences(policy.model, policy.tokenizer, task, task.eval_prompts()[:n])
            return {"eval/ece": expected_calibration_error(confidences, correct, n_bins)}
        if task.kind == "bandit" and beta is not None and ref_logprobs is not None:
            from lab.tasks.enumerable import next_token_logprobs, pi_star

            prompts = task.eval_prompts()
            logprobs = next_token_logprobs(policy.model, policy.tokenizer, prompts)  # (B, V)
            rewards = task.reward_tables(prompts, policy.tokenizer).to(logprobs)  # (B, V)
            target = pi_star(ref_logprobs.to(logprobs), rewards, beta)  # (B, V)
            return {"eval/ece_to_optimum": ece_from_bins(exact_calibration_bins(logprobs, target, n_bins))}
        return {}
    finally:
        policy.model.train(was_training)


def reliability_figure(bins: list[dict], title: str = "reliability diagram", name: str = "π_θ"):
    """A plotly figure of ``reliability_bins``: accuracy against confidence per non-empty bin (marker size by the
    bin's share), the diagonal of perfect calibration, and the ECE in the title. Pass a list of (name, bins)
    pairs as ``bins`` to overlay several policies (before / after)."""
    import plotly.graph_objects as go

    series = bins if bins and isinstance(bins[0], tuple) else [(name, bins)]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated", line={"dash": "dot", "color": "gray"})
    )
    eces = []
    for label, data in series:
        full = [b for b in data if b["weight"] > 0]
        eces.append(f"{label} {ece_from_bins(data):.3f}")
        fig.add_trace(
            go.Scatter(
                x=[b["confidence"] for b in full],
                y=[b["accuracy"] for b in full],
                mode="lines+markers",
                name=label,
                marker={"size": [6 + 30 * b["weight"] ** 0.5 for b in full]},
                customdata=[[b["count"], b["weight"]] for b in full],
                hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata[0]} answers<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"{title} (ECE: {', '.join(eces)})",
        xaxis={"title": "confidence π_θ(y|x)", "range": [0, 1]},
        yaxis={"title": "accuracy", "range": [0, 1]},
        width=520,
        height=460,
    )
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Reading them back from run records


def window_means(rows: list[dict], names: list[str], steps: range) -> dict:
    """Mean of each metric over the rows (``metrics.jsonl`` lines) whose ``step`` is in ``steps``, skipping rows
    that lack it; None for a metric no such row has."""
    out = {}
    for name in names:
        values = [r[name] for r in rows if r.get("step") in steps and r.get(name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.diagnostics RUN [RUN ...]``: each run's early and final means of its reward, gold reward, KL
    and diversity metrics (early: steps ``--early A B``; final: the last ``--final N`` steps)."""
    import sys
    from pathlib import Path

    from lab.config import ArgumentParser
    from lab.errors import UserError
    from lab.records import load_run

    parser = ArgumentParser(prog="python -m lab.diagnostics", description=main.__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, or run ids under --out")
    parser.add_argument("--out", default="runs", help="where run ids are looked up (default: runs)")
    parser.add_argument("--early", type=int, nargs=2, default=[11, 20], metavar=("FIRST", "LAST"),
                        help="the steps of the early window (default: 11 20)")  # fmt: skip
    parser.add_argument("--final", type=int, default=40, help="the last N steps (default: 40)")
    default_metrics = ["reward/mean", "reward/gold", "kl/ref", "diversity/distinct_1", "diversity/distinct_2"]
    parser.add_argument("--metrics", nargs="+", help=f"default: {' '.join(default_metrics)}")
    args = parser.parse_args(argv)
    if not 1 <= args.early[0] <= args.early[1] or args.final < 1:
        parser.error(f"--early FIRST LAST needs 1 ≤ FIRST ≤ LAST and --final ≥ 1, got {args.early} and {args.final}")
    try:
        runs = [load_run(p if Path(p).is_dir() else Path(args.out) / p) for p in args.runs]
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logged = set().union(*(row.keys() for run in runs for row in run.metrics))
    unknown = [m for m in args.metrics or () if m not in logged]
    args.metrics = args.metrics or default_metrics
    if unknown:
        parser.error(f"--metrics: {', '.join(unknown)} logged by none of these runs")
    print("| run | " + " | ".join(f"{m}, early → final" for m in args.metrics) + " |")
    print("|---|" + "---|" * len(args.metrics))
    for run in runs:
        rows = run.metrics
        last = max(r["step"] for r in rows)
        early = window_means(rows, args.metrics, range(args.early[0], args.early[1] + 1))
        final = window_means(rows, args.metrics, range(last - args.final + 1, last + 1))
        cells = [
            "—" if early[m] is None or final[m] is None else f"{early[m]:.3f} → {final[m]:.3f}" for m in args.metrics
        ]
        print(f"| {run.path.name} | " + " | ".join(cells) + " |")
    if last < args.early[1]:
        print(f"(a run shorter than step {args.early[1]} leaves the early window empty: set --early)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
