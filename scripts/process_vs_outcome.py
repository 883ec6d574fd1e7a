"""GRPO on arith with the outcome reward against the per-digit process reward, at the same sample budget.

    python scripts/process_vs_outcome.py                          # 20 rollouts of 4 × 8, seeds 0-2, eval every 5
    python scripts/process_vs_outcome.py --steps 40 --batch-size 8 --seeds 0

Both modes share seed, prompts, budget and every other setting (GRPOConfig defaults); only ``reward_mode`` differs
(lab.process_reward). Prints the greedy held-out accuracy at each evaluation (mean ± sd over seeds), writes it to
results/process_vs_outcome.md and the runs under --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.grpo import GRPOConfig, train  # noqa: E402


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="rollouts per run")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per rollout (G = 8 completions each)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs")
    parser.add_argument("--results", default=str(ROOT / "results"), help="folder for the .md")
    args = parser.parse_args(argv)
    accuracy: dict[str, dict[int, list[float]]] = {}  # mode -> step -> one accuracy per seed
    for mode in ("outcome", "process"):
        for seed in args.seeds:
            cfg = GRPOConfig(
                task="arith",
                reward_mode=mode,
                steps=args.steps,
                batch_size=args.batch_size,
                eval_every=args.eval_every,
                seed=seed,
                out=args.out,
                sample_every=0,
            )
            for m in train(cfg):
                if "eval/accuracy" in m:
                    accuracy.setdefault(mode, {}).setdefault(m["step"], []).append(m["eval/accuracy"])
    steps = sorted(accuracy["outcome"])
    lines = [
        "| reward_mode | " + " | ".join(f"step {s}" for s in steps) + " |",
        "| --- |" + " ---: |" * len(steps),
        *(f"| {mode} | " + " | ".join(spread(accuracy[mode][s]) for s in steps) + " |" for mode in accuracy),
    ]
    title = (
        f"GRPO on arith, {args.steps} rollouts of {args.batch_size} prompts × G = 8, seeds "
        f"{', '.join(map(str, args.seeds))}: greedy held-out accuracy (200 problems; 0.58 before training)"
    )
    print(title)
    print("\n".join(lines))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    command = "python scripts/process_vs_outcome.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (results / "process_vs_outcome.md").write_text(
        f"# Process vs outcome reward\n\n`{command.strip()}`: {title}\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
