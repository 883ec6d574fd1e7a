"""Reward over-optimization (Gao et al. 2022) on `reviews`: optimize a learned reward model hard and the gold reward
stops following it; a KL penalty β > 0 holds the gap back.

    python scripts/overoptimization.py       # a few minutes on a laptop CPU

1. trains a Bradley–Terry reward model r_φ on the shipped reviews preference pairs (or takes --rm PATH);
2. runs PPO against r_φ from the built-in policy with β = 0 and with β = --beta, each for the same seeds,
   identical otherwise;
3. logs, every step, r_φ and r_gold of the same rollouts, and KL(π_θ‖π_ref).

The gold reward has penalties (repeated words, more than 12 words, no end) that the reward model sees only through
the few preference pairs where they occur; the policy finds them. The gap is r_φ − r_gold of the rollouts. r_φ is
fitted to score *differences*, so the gap has an arbitrary offset, the same for every run (one reward model): what
matters is how it moves. It is taken twice per run, as rollout means over two windows:

    early   steps 11–20, once both runs have removed the obvious failures (there the two rewards move together)
    final   the last 40 steps

Writes results/overoptimization.html (plotly: every run's curves vs step and vs KL), results/overoptimization.md
(the table) and results/overoptimization.json; run records go to runs/overoptimization/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lab.modeling import load_policy  # noqa: E402
from lab.ppo import PPOConfig  # noqa: E402
from lab.ppo import train as train_ppo
from lab.rm import RewardConfig  # noqa: E402
from lab.rm import train as train_rm
from lab.tasks import get_task  # noqa: E402

KEYS = ("step", "reward/mean", "reward/gold", "kl/ref", "completion/length", "completion/truncated_frac", "entropy")
EARLY = (11, 20)  # steps of the "early" window
TAIL = 40  # the "final" window: this many last steps


def run_ppo(rm_path: str, beta: float, seed: int, steps: int, out: Path) -> tuple[list[dict], list]:
    """PPO against the reward model; returns the per-step curve and the last step's samples."""
    policy = load_policy("reviews", mode="lora")
    cfg = PPOConfig(
        task="reviews",
        reward=rm_path,
        beta=beta,
        steps=steps,
        seed=seed,
        out=str(out),
        run_id=f"ppo-beta-{beta:g}-seed-{seed}",
        sample_every=steps,
    )
    curve = []
    for m in train_ppo(cfg, policy=policy):
        curve.append({k: float(m[k]) for k in KEYS})
        if m["step"] % 20 == 0 or m["step"] == 1:
            print(
                f"   β={beta:<4g} seed {seed}  step {m['step']:>4}  r_φ {m['reward/mean']:+6.2f}  "
                f"gold {m['reward/gold']:+6.2f}  kl {m['kl/ref']:6.2f}  tokens {m['completion/length']:.1f}",
                flush=True,
            )
    samples = [json.loads(line) for line in (out / cfg.run_id / "samples.jsonl").read_text().splitlines()]
    return curve, [s for s in samples if s.get("step") == steps]


def window(curve: list[dict], key: str, first: int, last: int) -> float:
    xs = [c[key] for c in curve if first <= c["step"] <= last]
    return sum(xs) / len(xs)


def smooth(xs: list[float], k: int = 5) -> list[float]:
    """Trailing mean over k steps (a rollout batch mean is noisy)."""
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def figure(runs: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("reward vs PPO step (5-step trailing mean)", "reward vs KL(π_θ‖π_ref) per completion"),
    )
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    betas = sorted({beta for beta, _ in runs})
    for (beta, seed), curve in runs.items():
        color = colors[betas.index(beta) % len(colors)]
        rm = [c["reward/mean"] for c in curve]
        gold = [c["reward/gold"] for c in curve]
        steps, kl = [c["step"] for c in curve], [c["kl/ref"] for c in curve]
        for name, ys, dash in (("reward model r_φ", rm, "dash"), ("gold reward", gold, "solid")):
            group = f"β={beta:g}: {name}"
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=smooth(ys),
                    mode="lines",
                    name=group,
                    legendgroup=group,
                    showlegend=seed == min(s for b, s in runs if b == beta),
                    line=dict(color=color, dash=dash),
                    hovertext=f"seed {seed}",
                ),
                row=1,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=kl,
                    y=ys,
                    mode="markers",
                    name=group,
                    legendgroup=group,
                    showlegend=False,
                    marker=dict(color=color, size=4, symbol="circle-open" if dash == "dash" else "circle"),
                    hovertext=f"seed {seed}",
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="PPO step", row=1, col=1)
    fig.update_xaxes(title_text="KL (nats)", row=1, col=2)
    fig.update_yaxes(title_text="rollout mean reward", row=1, col=1)
    fig.update_layout(
        title="Reward over-optimization on reviews: PPO against a learned reward model, β = 0 vs β > 0",
        height=500,
        width=1150,
        template="plotly_white",
    )
    fig.write_html(path, include_plotlyjs="directory")  # plotly.min.js once, beside the figures, offline


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", default=None, help="a trained reward model (run folder); default: train one")
    parser.add_argument("--rm-steps", type=int, default=150, help="reward-model optimizer steps")
    parser.add_argument("--steps", type=int, default=120, help="PPO iterations per run")
    parser.add_argument("--beta", type=float, default=0.1, help="the β > 0 runs' KL coefficient")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per β per seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny models run fastest on one)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "overoptimization"), help="folder for run records")
    parser.add_argument("--results", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    if args.rm is not None and Path(args.rm).resolve().is_relative_to(Path(args.out).resolve()):
        parser.error(f"--rm {args.rm} lies inside --out {args.out}, which is cleared first; copy it elsewhere")
    return args


def reward_model(args, out: Path) -> tuple[str, dict]:
    """--rm, or a reward model trained for --rm-steps; its path and held-out metrics (empty for --rm)."""
    if args.rm is not None:
        return args.rm, {}
    print(f"1. reward model: {args.rm_steps} steps on the reviews preference pairs", flush=True)
    for m in train_rm(RewardConfig(task="reviews", steps=args.rm_steps, out=str(out), run_id="rm")):  # noqa: B007 - the last step's metrics are read below
        pass
    rm_eval = {k.removeprefix("eval/"): v for k, v in m.items() if k.startswith("eval/")}
    print("   held-out " + "  ".join(f"{k}={v:.3f}" for k, v in rm_eval.items()))
    return str(out / "rm"), rm_eval


def summarize(runs: dict, betas: tuple[float, ...]) -> tuple[list[dict], list[dict]]:
    """Per run, and per β averaged over seeds: r_φ, gold, gap and KL over the early and the final windows."""
    per_run = []
    for (beta, seed), curve in runs.items():
        last = curve[-1]["step"]
        row = {"beta": beta, "seed": seed}
        for name, (first, final) in (("early", EARLY), ("final", (last - TAIL + 1, last))):
            row[f"rm_{name}"] = window(curve, "reward/mean", first, final)
            row[f"gold_{name}"] = window(curve, "reward/gold", first, final)
            row[f"gap_{name}"] = row[f"rm_{name}"] - row[f"gold_{name}"]
            row[f"kl_{name}"] = window(curve, "kl/ref", first, final)
        row["tokens_final"] = window(curve, "completion/length", last - TAIL + 1, last)
        per_run.append(row)
    table = []
    for beta in betas:
        rows = [r for r in per_run if r["beta"] == beta]
        table.append(
            {
                "beta": beta,
                **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("beta", "seed")},
                "gaps_final": [round(r["gap_final"], 2) for r in rows],
            }
        )
    return per_run, table


def report(args, command: str, elapsed: float, rm_eval: dict, table: list[dict], samples: dict) -> list[str]:
    """results/overoptimization.md, line by line."""
    lines = [
        "# Reward over-optimization on reviews\n",
        f"Command: `{command}` ({elapsed:.0f} s on this machine). Figure: results/overoptimization.html\n",
        "PPO (PPOConfig defaults otherwise) against a learned reward model r_φ"
        + (
            f" (held-out accuracy {rm_eval['accuracy']:.3f}, Spearman with gold {rm_eval['spearman']:.3f})"
            if "accuracy" in rm_eval and "spearman" in rm_eval
            else ""
        )
        + f", {args.steps} steps, seeds {', '.join(map(str, args.seeds))}; rollout means, averaged over seeds. "
        f"Early = steps {EARLY[0]}–{EARLY[1]}, final = the last {TAIL} steps. gap = r_φ − r_gold (its offset is "
        "arbitrary but shared by all runs: compare how it moves).\n",
        "| β | r_φ early → final | gold early → final | gap early → final (final per seed) | KL final (nats) "
        "| tokens final |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['beta']:g} | {r['rm_early']:+.2f} → {r['rm_final']:+.2f} | {r['gold_early']:+.2f} → "
        f"{r['gold_final']:+.2f} | {r['gap_early']:+.2f} → **{r['gap_final']:+.2f}** "
        f"({', '.join(f'{g:+.2f}' for g in r['gaps_final'])}) | {r['kl_final']:.1f} | {r['tokens_final']:.1f} |"
        for r in table
    ]
    lines += ["", "Samples at the last step (seed " + str(args.seeds[0]) + "):", ""]
    for beta in (0.0, args.beta):
        for s in samples[beta, args.seeds[0]][:2]:
            gold = get_task("reviews").gold_reward(s["prompt"], s["completion"], s.get("truncated", False))
            lines.append(f"- β={beta:g}: `{s['completion']}` (r_φ {s['reward']:+.1f}, gold {gold:+.1f})")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, results = Path(args.out), Path(args.results)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()

    rm_path, rm_eval = reward_model(args, out)
    runs, samples = {}, {}
    for beta in (0.0, args.beta):
        for seed in args.seeds:
            print(f"2. PPO against r_φ, β = {beta:g}, seed {seed}, {args.steps} steps", flush=True)
            runs[beta, seed], samples[beta, seed] = run_ppo(rm_path, beta, seed, args.steps, out)
    elapsed = time.time() - started
    figure(runs, results / "overoptimization.html")

    per_run, table = summarize(runs, (0.0, args.beta))
    command = (
        "python scripts/overoptimization.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    lines = report(args, command, elapsed, rm_eval, table, samples)
    (results / "overoptimization.md").write_text("\n".join(lines) + "\n")
    (results / "overoptimization.json").write_text(
        json.dumps(
            {
                "command": command,
                "seconds": round(elapsed, 1),
                "rm": rm_path,
                "rm_eval": rm_eval,
                "table": table,
                "runs": per_run,
                "curves": {f"beta={b:g},seed={s}": c for (b, s), c in runs.items()},
                "samples": {f"beta={b:g},seed={s}": v for (b, s), v in samples.items()},
            },
            indent=1,
        )
    )
    print("\n".join(lines))
    print(f"\nwrote {results / 'overoptimization.html'}, .md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
