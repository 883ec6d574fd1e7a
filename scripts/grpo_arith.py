"""GRPO on `arith` from the shipped base model to ≥ 90% greedy accuracy on the held-out split.

    python scripts/grpo_arith.py                      # the GRPOConfig defaults, as `python -m lab train grpo`
    python scripts/grpo_arith.py --steps 80 --seed 1  # any GRPOConfig field as a flag

Writes results/grpo_arith.md and results/grpo_arith.json (before/after accuracy, the first step at which the
held-out greedy accuracy reached the target, wall time) and results/grpo_arith.html (accuracy and reward curves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.config import add_config_arguments, config_from_args  # noqa: E402
from lab.grpo import GRPOConfig, train  # noqa: E402

TARGET = 0.9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, GRPOConfig)
    parser.add_argument("--results", default=str(ROOT / "results"), help="folder for the .md / .json / .html")
    args = parser.parse_args(argv)
    cfg = config_from_args(GRPOConfig, args, **({} if "out" in vars(args) else {"out": str(ROOT / "runs")}))
    cfg = cfg.replace(task="arith")

    load_before = os.getloadavg()[0]
    started = time.time()
    history = []
    reached = None
    for metrics in train(cfg):
        history.append(metrics)
        line = f"step {metrics['step']:>3}  reward {metrics['reward/mean']:.3f}  zero-std {metrics['groups/zero_std_frac']:.2f}"
        if "eval/accuracy" in metrics:
            line += f"  eval/accuracy {metrics['eval/accuracy']:.3f}"
            if reached is None and metrics["eval/accuracy"] >= TARGET:
                reached = {"step": metrics["step"], "seconds": round(time.time() - started, 1)}
        print(line, flush=True)
    wall = time.time() - started

    from lab.records import list_runs

    run = max(list_runs(cfg.out), key=lambda r: str(r.status.get("started", "")))
    summary = run.status.get("summary") or {}
    before = summary.get("before", {}).get("eval/accuracy")
    after = summary.get("after", {}).get("eval/accuracy")
    result = {
        "command": "python scripts/grpo_arith.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "run_id")},
        "before_accuracy": before,
        "after_accuracy": after,
        "eval_prompts": cfg.eval_size,
        "target": TARGET,
        "reached_target": reached,
        "steps": cfg.steps,
        "completions_per_step": cfg.batch_size * cfg.group_size,
        "wall_time_s": round(wall, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {_threads()}, "
        f"load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end",
        "run": _relative(run.path),
        "curve": [
            {"step": m["step"], "reward/mean": m["reward/mean"], "eval/accuracy": m.get("eval/accuracy")}
            for m in history
        ],
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_arith.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "grpo_arith.md").write_text(_markdown(result))
    _figure(history, out / "grpo_arith.html")
    print(_markdown(result))
    return 0


def _relative(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _markdown(r: dict) -> str:
    reached = r["reached_target"]
    c = r["config"]
    lines = [
        "# GRPO on arith",
        "",
        f"Command: `{r['command'].strip()}`  ",
        f"Config: mode={c['mode']}, lr={c['lr']}, batch_size={c['batch_size']} prompts × group_size={c['group_size']}"
        f" = {r['completions_per_step']} completions per step, beta={c['beta']}, loss_norm={c['loss_norm']}, "
        f"seed={c['seed']}  ",
        f"Machine: {r['machine']}",
        "",
        "| greedy accuracy on held-out prompts | value |",
        "|---|---|",
        f"| before (shipped base model) | {r['before_accuracy']:.3f} |",
        f"| after {r['steps']} steps | {r['after_accuracy']:.3f} |",
        f"| first step with ≥ {r['target']:.0%} | "
        + (f"{reached['step']} ({reached['seconds']} s)" if reached else "not reached")
        + " |",
        f"| wall time, whole run | {r['wall_time_s']} s |",
        "",
        f"Held-out prompts: {r['eval_prompts']}. Run record: `{r['run']}`.",
        "",
    ]
    return "\n".join(lines)


def _figure(history: list[dict], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("reward/mean (sampled)", "eval/accuracy (greedy, held-out)"))
    fig.add_trace(
        go.Scatter(x=[m["step"] for m in history], y=[m["reward/mean"] for m in history], name="reward/mean"),
        row=1,
        col=1,
    )
    evals = [m for m in history if "eval/accuracy" in m]
    fig.add_trace(
        go.Scatter(
            x=[m["step"] for m in evals],
            y=[m["eval/accuracy"] for m in evals],
            name="eval/accuracy",
            mode="lines+markers",
        ),
        row=1,
        col=2,
    )
    fig.add_hline(y=TARGET, line_dash="dot", row=1, col=2)
    fig.update_layout(title="GRPO on arith", height=400, width=950)
    fig.write_html(path, include_plotlyjs="directory")  # plotly.min.js once, beside the figures, offline


if __name__ == "__main__":
    raise SystemExit(main())
