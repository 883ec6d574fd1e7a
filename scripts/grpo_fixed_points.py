"""Where GRPO's KL choices settle on `bandit`: the exact fixed point of each ``kl_mode``, against π*.

    python scripts/grpo_fixed_points.py

For each β, with and without std scaling of the group advantages, prints KL(π* ‖ fixed point) as a share of
KL(π* ‖ π_ref), the distance GRPO has to travel. ``k1_reward`` (the default) settles at π* itself; ``k3``
(DeepSeekMath) and ``k3_ratio`` (TRL's bias-corrected k3) settle elsewhere. Exact: every group of G answers is
enumerated (``lab.fixed_points``); no sampling, a few seconds on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `lab` from this checkout

from lab.fixed_points import grpo_fixed_point  # noqa: E402
from lab.tasks import get_task  # noqa: E402
from lab.tasks.base import load_builtin  # noqa: E402
from lab.tasks.enumerable import kl, next_token_logprobs, pi_star  # noqa: E402

G = 8
MODES = ("k1_reward", "k3", "k3_ratio")


@torch.no_grad()
def main() -> int:
    task = get_task("bandit")
    model, tokenizer = load_builtin("bandit")
    prompts = task.eval_prompts()
    ref = next_token_logprobs(model, tokenizer, prompts)  # (B, V) log π_ref
    rewards = task.reward_tables(prompts, tokenizer)  # (B, V)
    print(f"bandit, G = {G}: KL(π* ‖ fixed point) as a share of KL(π* ‖ π_ref)\n")
    print("| std scaling | β | KL(π*‖π_ref) | " + " | ".join(MODES) + " |")
    print("|---|---|---|" + "---|" * len(MODES))
    for scale in (True, False):
        for beta in (0.1, 0.5):
            star = pi_star(ref, rewards, beta)  # (B, V)
            start = float(kl(star, ref).mean())
            shares = []
            for mode in MODES:
                fixed = grpo_fixed_point(ref, rewards, beta, mode, G, scale)  # (B, V)
                shares.append(f"{float(kl(star, fixed).mean()) / start:.1%}")
            print(f"| {'on' if scale else 'off'} | {beta} | {start:.3f} | " + " | ".join(shares) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
