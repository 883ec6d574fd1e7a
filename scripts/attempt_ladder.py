"""The attempt ladder on one task and one sample budget: policy gradient, importance sampling without a clip, PPO's clip.

    python scripts/attempt_ladder.py                      # arith, 20 rollouts of 8 × 8, μ = 8, lr 1e-3
    python scripts/attempt_ladder.py --task bandit --lr 3e-3 --mu 4

Prints one row per attempt (lab.ladder.ladder_table), writes it to results/attempt_ladder.md and every step's
metrics to results/attempt_ladder.json, and the three runs under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.ladder import DEFAULTS, format_table, ladder_table, run_ladder  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=DEFAULTS["task"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="rollouts per attempt")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--mu", type=int, default=DEFAULTS["num_iterations"], help="passes per rollout, attempts 2, 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--results", default=str(ROOT / "results"), help="folder for the .md and .json")
    args = parser.parse_args(argv)
    curves = run_ladder(
        task=args.task, steps=args.steps, lr=args.lr, num_iterations=args.mu, seed=args.seed, out=args.out
    )
    title = (
        f"{args.task}, {args.steps} rollouts each, μ = {args.mu} for attempts 2 and 3, lr {args.lr}, seed {args.seed}"
    )
    table = format_table(ladder_table(curves))
    print(title)
    print(table)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    command = "python scripts/attempt_ladder.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (results / "attempt_ladder.md").write_text(
        f"# The attempt ladder\n\n`{command.strip()}`: {title}\n\n```\n{table}\n```\n"
    )
    (results / "attempt_ladder.json").write_text(json.dumps({"title": title, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
