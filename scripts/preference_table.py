"""Learning from preferences on `reviews`, one row per method, measured the same way for all.

    python scripts/preference_table.py                      # trains the reward model first
    python scripts/preference_table.py --reward-model runs/rm-...   # reuse a trained one

Rows: DPO (sigmoid), length-normalized DPO, SimPO, IPO, SFT on the preferred answers, conditional SFT on the pairs
(each trained with its config defaults), and best-of-8 with the reward model (no training). Columns, all on the
held-out prompts:

    greedy gold before / after   gold reward of the greedy answer, base policy vs trained policy
    sampled gold after           mean gold reward of temperature-1 samples (for best-of-N: of its picks)
    kl/ref                       KL(π_θ ‖ π_ref), k1 estimate over the same samples (best-of-N: log N − (N−1)/N)
    distinct-2, entropy          diversity of the same samples: diversity/distinct_2, diversity/entropy
    wall s                       training (or best-of-N sampling and scoring) time on this machine

Conditional SFT is measured as it is deployed: every answer is generated after the prompt and its `good` control,
and its kl/ref is KL(π_θ(·|x, good) ‖ π_ref(·|x)) (lab/csft.py).

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
    ("conditional SFT", "csft", {}),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", default=None, help="a trained reward-model run; default: train one")
    parser.add_argument("--task", default="reviews")
    parser.add_argument("--n", type=int, default=8, help="N of best-of-N")
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out prompt for sampled gold / KL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=str(REPO / "runs" / "preference_table"), help="where run records go")
    parser.add_argument("--out", default=str(REPO / "results" / "preference_table.md"))
    return parser.parse_args(argv)


def measure(policy, task, samples: int, seed: int, method: str | None = None) -> dict:
    """Held-out greedy gold reward, sampled gold reward, kl/ref and diversity, the same way for every row
    (conditional SFT: behind its `good` control, ``lab.csft.heldout``)."""
    from types import SimpleNamespace

    from lab.evaluate import preference_heldout

    cfg = SimpleNamespace(
        eval_size=len(task.eval_prompts()), max_new_tokens=None, kl_samples=samples, seed=seed, beta=None
    )
    if method == "csft":
        from lab.csft import CSFTConfig, heldout

        return heldout(policy, task, CSFTConfig(task=task.name, eval_size=cfg.eval_size, kl_samples=samples, seed=seed))
    return preference_heldout(policy, task, cfg, use_reference=True)


def row(label: str, greedy_before: float, after: dict | None, sampled: float, kl: float, wall: float) -> dict:
    """One line of the table; ``after`` None for best-of-N (no trained policy, no greedy answer)."""
    after = after or {}
    return {
        "label": label,
        "greedy_before": greedy_before,
        "greedy_after": after.get("eval/gold_reward"),
        "sampled": sampled,
        "kl": kl,
        "distinct_2": after.get("diversity/distinct_2"),
        "entropy": after.get("diversity/entropy"),
        "wall": wall,
    }


def train_reward_model(args) -> tuple[str, str]:
    """The reward model for best-of-N: ``--reward-model``, else trained now. Returns (run folder, summary line)."""
    from lab.methods import get_method

    if args.reward_model is not None:
        return args.reward_model, ""
    config_cls, train = get_method("rm")
    cfg = config_cls(task=args.task, out=args.runs, seed=args.seed, run_id=time.strftime("rm-%Y%m%d-%H%M%S"))
    t0 = time.time()
    last = list(train(cfg))[-1]
    line = (
        f"Reward model (`python -m lab train rm --task {args.task}`, {cfg.steps} steps, "
        f"{time.time() - t0:.0f} s): held-out pair accuracy {last['eval/accuracy']:.3f} "
        f"(Bayes limit {last['eval/bayes_accuracy']:.3f}), Spearman with the gold reward "
        f"{last['eval/spearman']:.3f} within prompts ({last['eval/spearman_pooled']:.3f} pooled)."
    )
    print(line, flush=True)
    return str(Path(args.runs) / cfg.run_id), line


def base_row(args, task) -> dict:
    """The base policy π_ref, before any training, measured as every trained one is."""
    import torch

    from lab.methods import get_method
    from lab.runner import load_for

    torch.manual_seed(args.seed)
    config_cls, _ = get_method("dpo")
    before = measure(load_for(config_cls(task=args.task), task), task, args.samples, args.seed)
    return row("base policy (π_ref)", before["eval/gold_reward"], before, before["eval/sample_reward"], 0.0, 0.0)


def trained_rows(args, task, base: dict) -> list[dict]:
    """Each method of METHODS trained with its config defaults from the base policy, then measured."""
    from lab.methods import get_method
    from lab.runner import load_for

    rows = []
    for label, method, overrides in METHODS:
        config_cls, train = get_method(method)
        cfg = config_cls(task=args.task, out=args.runs, seed=args.seed, **overrides)
        policy = load_for(cfg, task)
        t0 = time.time()
        for _ in train(cfg, policy=policy):
            pass
        wall = time.time() - t0
        after = measure(policy, task, args.samples, args.seed, method)
        rows.append(
            row(
                f"{label} ({cfg.steps} steps)",
                base["greedy_before"],
                after,
                after["eval/sample_reward"],
                after["kl/ref"],
                wall,
            )
        )
        print(f"{label}: {after}  {wall:.0f} s", flush=True)
    return rows


def best_of_n_row(args, rm_path: str, base: dict) -> dict:
    """Best-of-N with the reward model: no training; its kl/ref is the bound log N − (N−1)/N."""
    from lab.baselines import BestOfNConfig, run_best_of_n

    t0 = time.time()
    bon = run_best_of_n(
        BestOfNConfig(reward_model=rm_path, n=args.n, task=args.task, rounds=args.samples, seed=args.seed)
    )
    label = f"best-of-{args.n} (reward model)"
    return {
        **row(label, base["greedy_before"], None, bon["eval/gold_reward"], bon["kl/ref"], time.time() - t0),
        "bound": True,
    }


def render(args, task, rows: list[dict], rm_line: str, total_s: float) -> str:
    """The markdown table with its header lines."""
    import torch

    def num(value, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    threads = torch.get_num_threads()
    lines = [
        f"# Learning from preferences on `{args.task}`",
        "",
        f"Measured with `python scripts/preference_table.py` on {platform.machine()} CPU "
        f"({threads} thread{'s' if threads != 1 else ''}), seed {args.seed}; total {total_s:.0f} s.",
        f"Held-out: {len(task.eval_prompts())} prompts; greedy = one answer each, sampled = {args.samples} "
        f"temperature-1 samples each. kl/ref is KL(π_θ‖π_ref) in nats per completion (k1 over the samples); for "
        f"best-of-N it is the bound log N − (N−1)/N. distinct-2 and entropy (nats) are the diversity of the same "
        f"samples. Conditional SFT answers behind its `good` control.",
        "",
    ]
    if rm_line:
        lines += [rm_line, ""]
    lines += [
        "| method | greedy gold before | greedy gold after | sampled gold after | kl/ref | distinct-2 | entropy | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kl = f"≤ {r['kl']:.3f}" if r.get("bound") else f"{r['kl']:.3f}"
        lines.append(
            f"| {r['label']} | {num(r['greedy_before'])} | {num(r['greedy_after'])} | {num(r['sampled'])} | {kl} | "
            f"{num(r['distinct_2'], 3)} | {num(r['entropy'])} | {r['wall']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from lab.tasks import get_task

    task = get_task(args.task)
    start = time.time()
    rm_path, rm_line = train_reward_model(args)  # 0. the reward model (for best-of-N)
    base = base_row(args, task)  # 1. the base policy, before any training
    rows = [base, *trained_rows(args, task, base)]  # 2. the trained methods, each with its config defaults
    rows.append(best_of_n_row(args, rm_path, base))  # 3. best-of-N with the reward model: no training
    text = render(args, task, rows, rm_line, time.time() - start)  # 4. the table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
