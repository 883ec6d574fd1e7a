"""PPO-RLHF on `reviews` with a learned reward model raises the held-out gold reward.

    python scripts/ppo_reviews.py            # ~3-5 min on a laptop CPU

1. trains a Bradley–Terry reward model on the shipped reviews preference pairs (lab.rm, as
   `python -m lab train rm --task reviews` does);
2. runs PPO (lab.ppo) against that reward model, from the built-in reviews policy;
3. scores the policy before and after on the held-out prompts, by sampling (temperature 1, several samples per
   prompt, the distribution PPO optimizes) and greedily, with the gold reward and with the reward model.

Writes results/ppo_reviews.md and results/ppo_reviews.json; run records go to runs/ppo_reviews/.
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

from lab.evaluate import answer  # noqa: E402
from lab.modeling import load_policy  # noqa: E402
from lab.ppo import PPOConfig  # noqa: E402
from lab.ppo import train as train_ppo
from lab.rewards import make_reward  # noqa: E402
from lab.rm import RewardConfig  # noqa: E402
from lab.rm import train as train_rm
from lab.tasks import get_task  # noqa: E402


def train_reward_model(out: Path, steps: int, seed: int = 0) -> tuple[Path, dict]:
    """A reward model on the reviews preference pairs; returns (run folder, its summary)."""
    cfg = RewardConfig(task="reviews", steps=steps, out=str(out), run_id="rm", seed=seed)
    for _ in train_rm(cfg):
        pass
    status = json.loads((out / "rm" / "status.json").read_text())
    return out / "rm", status.get("summary", {})


@torch.no_grad()
def held_out(policy, task, reward_fn, samples: int, seed: int = 0) -> dict:
    """Mean gold reward and RM score on the held-out prompts: sampled (`samples` per prompt) and greedy."""
    out = {}
    for name, greedy, k in (("sampled", False, samples), ("greedy", True, 1)):
        prompts = task.eval_prompts() * k
        ans = answer(policy.model, policy.tokenizer, task, prompts, greedy=greedy, seed=seed)
        rm = reward_fn(ans.prompts, ans.completions, ans.truncated)
        n = len(ans.rewards)
        out[name] = {
            "gold_reward": sum(ans.rewards) / n,
            "rm_score": float(rm.mean()),
            "no_eos_frac": sum(ans.truncated) / n,
            "words": sum(len(c.split()) for c in ans.completions) / n,
            "n": n,
            "examples": [
                {"prompt": p, "completion": c, "gold": g}
                for p, c, g in zip(ans.prompts[:3], ans.completions[:3], ans.rewards[:3])
            ],
        }
    return out


CURVE_KEYS = (
    "step",
    "reward/mean",
    "reward/gold",
    "kl/ref",
    "entropy",
    "value/explained_var",
    "clip/frac",
    "kl/approx",
    "completion/length",
    "completion/truncated_frac",
)
# the before/after table: (label, sampled or greedy, key, format)
ROWS = [
    ("held-out gold reward, sampled", "sampled", "gold_reward", "{:+.2f}"),
    ("held-out RM score, sampled", "sampled", "rm_score", "{:+.2f}"),
    ("held-out gold reward, greedy", "greedy", "gold_reward", "{:+.2f}"),
    ("no-EOS fraction, sampled", "sampled", "no_eos_frac", "{:.3f}"),
    ("words per completion, sampled", "sampled", "words", "{:.1f}"),
]


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm-steps", type=int, default=150, help="reward-model optimizer steps")
    parser.add_argument("--steps", type=int, default=60, help="PPO iterations")
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient β")
    parser.add_argument("--samples", type=int, default=32, help="held-out samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the tiny models run fastest on one)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "ppo_reviews"), help="folder for run records")
    parser.add_argument("--results", default=str(ROOT / "results"))
    return parser.parse_args(argv)


def run_ppo(args, policy, rm_path: Path, out: Path) -> tuple[PPOConfig, list[dict]]:
    """PPO against the reward model; returns its config and the per-step curve of CURVE_KEYS."""
    cfg = PPOConfig(
        task="reviews",
        reward=str(rm_path),
        steps=args.steps,
        beta=args.beta,
        seed=args.seed,
        out=str(out),
        run_id="ppo",
        eval_every=0,
    )
    curve = []
    for m in train_ppo(cfg, policy=policy):
        curve.append({k: m.get(k) for k in CURVE_KEYS})
        if m["step"] % 10 == 0 or m["step"] == 1:
            print(
                f"   step {m['step']:>3}  rm {m['reward/mean']:+.2f}  gold {m['reward/gold']:+.2f}  "
                f"kl {m['kl/ref']:.2f}  clip {m['clip/frac']:.3f}  ev {m['value/explained_var']:+.2f}"
            )
    return cfg, curve


def report(args, cfg, command: str, elapsed: float, rm_eval: dict, before: dict, after: dict) -> list[str]:
    """results/ppo_reviews.md, line by line."""
    lines = [
        "# PPO on reviews with a learned reward model\n",
        f"Command: `{command}` ({elapsed:.0f} s on this machine)\n",
        f"Reward model: {args.rm_steps} steps; held-out "
        + ", ".join(f"{k} {v:.3f}" for k, v in rm_eval.items())
        + "\n",
        f"PPO: {args.steps} iterations × {cfg.batch_size} prompts, β = {args.beta}, "
        f"{cfg.ppo_epochs} epochs × {cfg.num_minibatches} minibatches, lr {cfg.lr}. "
        f"Held-out: {len(get_task('reviews').eval_prompts())} prompts × {args.samples} samples (temperature 1) "
        "and greedy.\n",
        "| metric | before | after |",
        "|---|---:|---:|",
    ]
    for label, mode, key, fmt in ROWS:
        lines.append(f"| {label} | {fmt.format(before[mode][key])} | {fmt.format(after[mode][key])} |")
    lines += ["", "Sampled completions after PPO:", ""]
    lines += [f"- `{e['prompt']}` → `{e['completion']}` (gold {e['gold']:+.1f})" for e in after["sampled"]["examples"]]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, results = Path(args.out), Path(args.results)
    shutil.rmtree(out, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    task = get_task("reviews")
    started = time.time()

    print(f"1. reward model: {args.rm_steps} steps on the reviews preference pairs")
    rm_path, rm_summary = train_reward_model(out, args.rm_steps, args.seed)
    rm_eval = {
        k.removeprefix("eval/"): v for k, v in (rm_summary.get("eval") or {}).items() if isinstance(v, (int, float))
    }
    print(f"   {rm_path}  held-out: " + "  ".join(f"{k}={v:.3f}" for k, v in rm_eval.items()))
    reward_fn = make_reward(str(rm_path), task)

    torch.manual_seed(args.seed)
    policy = load_policy("reviews", mode="lora")
    before = held_out(policy, task, reward_fn, args.samples, args.seed)
    print(f"2. PPO against the reward model: {args.steps} iterations, β = {args.beta}")
    cfg, curve = run_ppo(args, policy, rm_path, out)
    after = held_out(policy, task, reward_fn, args.samples, args.seed)
    elapsed = time.time() - started

    command = "python scripts/ppo_reviews.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines = report(args, cfg, command, elapsed, rm_eval, before, after)
    (results / "ppo_reviews.md").write_text("\n".join(lines) + "\n")
    (results / "ppo_reviews.json").write_text(
        json.dumps(
            {
                "command": command,
                "seconds": round(elapsed, 1),
                "reward_model": rm_eval,
                "config": cfg.to_dict(),
                "before": before,
                "after": after,
                "curve": curve,
            },
            indent=1,
        )
    )
    print("\n".join(lines))
    print(f"\nwrote {results / 'ppo_reviews.md'} and {results / 'ppo_reviews.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
