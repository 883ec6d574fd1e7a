"""Reward over-optimization (Gao et al. 2022) on `reviews`: optimize a learned reward model hard and the gold reward
stops following it; a KL penalty β > 0 holds the gap back.

    python scripts/overoptimization.py       # a few minutes on a laptop CPU

1. trains a Bradley–Terry reward model r_φ on the shipped reviews preference pairs (or takes --rm PATH);
2. runs PPO against r_φ twice from the built-in policy, identical except for β: 0 and --beta;
3. logs, every step, the reward model's score and the gold reward of the same rollouts, and KL(π_θ‖π_ref).

The gold reward has penalties (repeated words, more than 12 words, no end) that the reward model sees only through
the few preference pairs where they occur; the policy finds them. r_φ is fitted to score *differences*, so its level
is arbitrary: we compare gains from the first step, and the gap is

    gap = (r_φ − r_φ at step 1) − (r_gold − r_gold at step 1)      (mean of the last 10 steps)

Writes results/overoptimization.html (plotly: both runs' curves vs step and vs KL), results/overoptimization.md
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
from lab.ppo import PPOConfig, train as train_ppo  # noqa: E402
from lab.rm import RewardConfig, train as train_rm  # noqa: E402

KEYS = ("step", "reward/mean", "reward/gold", "kl/ref", "completion/length", "completion/no_eos_frac", "entropy")


def run_ppo(rm_path: str, beta: float, steps: int, out: Path, seed: int, lr: float) -> tuple[list[dict], list]:
    """PPO against the reward model; returns the per-step curve and a few final samples."""
    torch.manual_seed(seed)
    policy = load_policy("reviews", mode="lora")
    cfg = PPOConfig(task="reviews", reward=rm_path, beta=beta, steps=steps, seed=seed, lr=lr, out=str(out),
                    run_id=f"ppo-beta-{beta:g}", sample_every=steps)
    curve = []
    for m in train_ppo(cfg, policy=policy):
        curve.append({k: float(m[k]) for k in KEYS})
        if m["step"] % 25 == 0 or m["step"] == 1:
            print(f"   β={beta:<5g} step {m['step']:>4}  rm {m['reward/mean']:+6.2f}  gold {m['reward/gold']:+6.2f}  "
                  f"kl {m['kl/ref']:6.2f}  words/tokens {m['completion/length']:.1f}")
    samples = [json.loads(line) for line in (out / cfg.run_id / "samples.jsonl").read_text().splitlines()]
    return curve, [s for s in samples if s.get("step") == steps][:4]


def gains(curve: list[dict]) -> tuple[list[float], list[float]]:
    rm0, gold0 = curve[0]["reward/mean"], curve[0]["reward/gold"]
    return [c["reward/mean"] - rm0 for c in curve], [c["reward/gold"] - gold0 for c in curve]


def tail_mean(xs: list[float], n: int = 10) -> float:
    return sum(xs[-n:]) / len(xs[-n:])


def figure(runs: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("gain vs PPO step", "gain vs KL(π_θ‖π_ref) per completion"))
    colors = {0: "#d62728", 1: "#1f77b4"}
    for i, (beta, curve) in enumerate(runs.items()):
        rm, gold = gains(curve)
        steps = [c["step"] for c in curve]
        kl = [c["kl/ref"] for c in curve]
        for col, x in ((1, steps), (2, kl)):
            mode = "lines" if col == 1 else "markers"
            fig.add_trace(go.Scatter(x=x, y=rm, mode=mode, name=f"β={beta:g}: reward model", legendgroup=f"{beta}rm",
                                     showlegend=col == 1, line=dict(color=colors[i], dash="dash"),
                                     marker=dict(color=colors[i], symbol="circle-open", size=5)), row=1, col=col)
            fig.add_trace(go.Scatter(x=x, y=gold, mode=mode, name=f"β={beta:g}: gold", legendgroup=f"{beta}gold",
                                     showlegend=col == 1, line=dict(color=colors[i]),
                                     marker=dict(color=colors[i], size=5)), row=1, col=col)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="KL (nats)", row=1, col=2)
    fig.update_yaxes(title_text="reward − reward at step 1", row=1, col=1)
    fig.update_layout(title="Reward over-optimization on reviews: PPO against a learned reward model",
                      height=480, width=1100, template="plotly_white")
    # plotly.js inline: the file opens offline, like the rest of the lab
    fig.write_html(path, include_plotlyjs=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", default=None, help="a trained reward model (run folder); default: train one")
    parser.add_argument("--rm-steps", type=int, default=150, help="reward-model optimizer steps")
    parser.add_argument("--steps", type=int, default=150, help="PPO iterations per run")
    parser.add_argument("--beta", type=float, default=0.1, help="the β > 0 run's KL coefficient")
    parser.add_argument("--lr", type=float, default=1e-3, help="PPO learning rate (both runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny models run fastest on one)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "overoptimization"), help="folder for run records")
    parser.add_argument("--results", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, results = Path(args.out), Path(args.results)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()

    rm_path = args.rm
    if rm_path is None:
        print(f"1. reward model: {args.rm_steps} steps on the reviews preference pairs")
        for m in train_rm(RewardConfig(task="reviews", steps=args.rm_steps, out=str(out), run_id="rm",
                                       seed=args.seed)):
            pass
        rm_path = str(out / "rm")
        print("   held-out " + "  ".join(f"{k}={v:.3f}" for k, v in m.items() if k.startswith("eval/")))

    runs, samples = {}, {}
    for beta in (0.0, args.beta):
        print(f"2. PPO against the reward model, β = {beta:g}, {args.steps} steps")
        runs[beta], samples[beta] = run_ppo(rm_path, beta, args.steps, out, args.seed, args.lr)
    elapsed = time.time() - started

    figure(runs, results / "overoptimization.html")
    command = "python scripts/overoptimization.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    table = []
    for beta, curve in runs.items():
        rm, gold = gains(curve)
        table.append({"beta": beta, "rm_gain": tail_mean(rm), "gold_gain": tail_mean(gold),
                      "gap": tail_mean(rm) - tail_mean(gold), "peak_gold_gain": max(gold),
                      "kl": tail_mean([c["kl/ref"] for c in curve]),
                      "length": tail_mean([c["completion/length"] for c in curve])})
    lines = ["# Reward over-optimization on reviews\n",
             f"Command: `{command}` ({elapsed:.0f} s on this machine). Figure: results/overoptimization.html\n",
             f"PPO against a learned reward model for {args.steps} steps, β = 0 vs β = {args.beta:g} (lr {args.lr}, "
             "otherwise PPOConfig defaults). Gains are relative to step 1 and averaged over the last 10 steps; "
             "gap = RM gain − gold gain.\n",
             "| β | RM gain | gold gain | gap | best gold gain | KL (nats) | tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['beta']:g} | {r['rm_gain']:+.2f} | {r['gold_gain']:+.2f} | {r['gap']:+.2f} | "
              f"{r['peak_gold_gain']:+.2f} | {r['kl']:.2f} | {r['length']:.1f} |" for r in table]
    lines += ["", "Final samples:", ""]
    for beta, rows in samples.items():
        lines += [f"- β={beta:g}: `{s['completion']}` (RM {s['reward']:+.1f})" for s in rows[:2]]
    (results / "overoptimization.md").write_text("\n".join(lines) + "\n")
    (results / "overoptimization.json").write_text(json.dumps(
        {"command": command, "seconds": round(elapsed, 1), "rm": rm_path, "table": table,
         "curves": {str(b): c for b, c in runs.items()}, "samples": {str(b): s for b, s in samples.items()}},
        indent=1))
    print("\n".join(lines))
    print(f"\nwrote {results / 'overoptimization.html'}, .md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
