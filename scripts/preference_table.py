"""Learning from preferences on `reviews`, one row per method, measured the same way for all.

    python scripts/preference_table.py                      # trains the reward model first
    python scripts/preference_table.py --reward-model runs/rm-...   # reuse a trained one

Rows: DPO (sigmoid), length-normalized DPO, SimPO, IPO, SFT on the preferred answers (each trained with its
config defaults), and best-of-8 with the reward model (no training). Columns, all on the held-out prompts:

    greedy gold before / after   gold reward of the greedy answer, base policy vs trained policy
    sampled gold after           mean gold reward of temperature-1 samples (for best-of-N: of its picks)
    kl/ref                       KL(π_θ ‖ π_ref), k1 estimate over the same samples (best-of-N: log N − (N−1)/N)
    wall s                       training (or best-of-N sampling and scoring) time on this machine

Writes results/preference_table.md and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = [  # (row label, method name, config overrides)
    ("DPO (sigmoid)", "dpo", {"loss_type": "sigmoid"}),
    ("length-normalized DPO", "dpo", {"loss_type": "length_normalized"}),
    ("SimPO", "dpo", {"loss_type": "simpo"}),
    ("IPO", "dpo", {"loss_type": "ipo"}),
    ("SFT on preferred", "sft-preferred", {}),
]


def measure(policy, task, samples: int, seed: int) -> dict:
    """Held-out greedy gold reward, sampled gold reward and kl/ref, the same way for every row."""
    from types import SimpleNamespace

    from lab.dpo import heldout_metrics

    cfg = SimpleNamespace(
        eval_size=len(task.eval_prompts()), max_new_tokens=None, kl_samples=samples, seed=seed, beta=None
    )
    return heldout_metrics(policy, task, cfg, use_reference=True)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", default=None, help="a trained reward-model run; default: train one")
    parser.add_argument("--task", default="reviews")
    parser.add_argument("--n", type=int, default=8, help="N of best-of-N")
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out prompt for sampled gold / KL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=str(REPO / "runs" / "preference_table"), help="where run records go")
    parser.add_argument("--out", default=str(REPO / "results" / "preference_table.md"))
    args = parser.parse_args(argv)

    import torch

    from lab.baselines import BestOfNConfig, run_best_of_n
    from lab.methods import get_method
    from lab.runner import load_for
    from lab.tasks import get_task

    task = get_task(args.task)
    start_all = time.time()
    lines = []

    # 0. the reward model (for best-of-N)
    rm_path, rm_line = args.reward_model, ""
    if rm_path is None:
        config_cls, train = get_method("rm")
        cfg = config_cls(task=args.task, out=args.runs, seed=args.seed, run_id=time.strftime("rm-%Y%m%d-%H%M%S"))
        t0 = time.time()
        last = list(train(cfg))[-1]
        rm_path = str(Path(args.runs) / cfg.run_id)
        rm_line = (
            f"Reward model (`python -m lab train rm --task {args.task}`, {cfg.steps} steps, "
            f"{time.time() - t0:.0f} s): held-out pair accuracy {last['eval/accuracy']:.3f} "
            f"(Bayes limit {last['eval/bayes_accuracy']:.3f}), Spearman with the gold reward "
            f"{last['eval/spearman']:.3f} within prompts ({last['eval/spearman_pooled']:.3f} pooled)."
        )
        print(rm_line, flush=True)

    # 1. the base policy, before any training
    torch.manual_seed(args.seed)
    config_cls, _ = get_method("dpo")
    base = load_for(config_cls(task=args.task), task)
    before = measure(base, task, args.samples, args.seed)
    lines.append(
        (
            "base policy (π_ref)",
            before["eval/gold_reward"],
            before["eval/gold_reward"],
            before["eval/sample_reward"],
            0.0,
            0.0,
        )
    )
    del base

    # 2. the trained methods, each with its config defaults
    for label, method, overrides in METHODS:
        config_cls, train = get_method(method)
        cfg = config_cls(task=args.task, out=args.runs, seed=args.seed, **overrides)
        policy = load_for(cfg, task)
        t0 = time.time()
        for _ in train(cfg, policy=policy):
            pass
        wall = time.time() - t0
        after = measure(policy, task, args.samples, args.seed)
        lines.append(
            (
                f"{label} ({cfg.steps} steps)",
                before["eval/gold_reward"],
                after["eval/gold_reward"],
                after["eval/sample_reward"],
                after["kl/ref"],
                wall,
            )
        )
        print(f"{label}: {after}  {wall:.0f} s", flush=True)

    # 3. best-of-N with the reward model: no training
    t0 = time.time()
    bon = run_best_of_n(
        BestOfNConfig(reward_model=rm_path, n=args.n, task=args.task, rounds=args.samples, seed=args.seed)
    )
    wall = time.time() - t0
    lines.append(
        (
            f"best-of-{args.n} (reward model)",
            before["eval/gold_reward"],
            None,
            bon["eval/gold_reward"],
            bon["kl/ref"],
            wall,
        )
    )

    # 4. the table
    n_prompts = len(task.eval_prompts())
    table = [
        f"# Learning from preferences on `{args.task}`",
        "",
        f"Measured with `python scripts/preference_table.py` on {platform.machine()} CPU "
        f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}), seed {args.seed}; total {time.time() - start_all:.0f} s.",
        f"Held-out: {n_prompts} prompts; greedy = one answer each, sampled = {args.samples} temperature-1 "
        f"samples each. kl/ref is KL(π_θ‖π_ref) in nats per completion (k1 over the samples); for best-of-N "
        f"it is the bound log N − (N−1)/N.",
        "",
    ]
    if rm_line:
        table += [rm_line, ""]
    table += [
        "| method | greedy gold before | greedy gold after | sampled gold after | kl/ref | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, g0, g1, s1, kl, wall in lines:
        g1_text = "—" if g1 is None else f"{g1:.2f}"
        kl_text = f"≤ {kl:.3f}" if label.startswith("best-of") else f"{kl:.3f}"
        table.append(f"| {label} | {g0:.2f} | {g1_text} | {s1:.2f} | {kl_text} | {wall:.0f} |")
    text = "\n".join(table) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
