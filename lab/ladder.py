"""The attempt ladder: why PPO clips, in three runs on the same task and the same samples.

Attempt 1, the policy gradient, uses each rollout once (μ = 1): the ratio ρ = π_θ/π_old is exactly 1, the estimate
is unbiased, and every update pays for fresh samples. Attempt 2 reuses each rollout for μ > 1 updates, correcting with
the importance ratio but no clip (ε = ∞)::

    L = − E_{y~π_old}[ ρ_t · Â ],      ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t)

As θ moves, ρ drifts from 1 and nothing stops it: a token whose advantage is positive is pushed up without limit, and
the few samples with large ρ dominate the gradient. Attempt 3 is PPO's clip: the term is −min(ρÂ, clip(ρ, 1 − ε,
1 + ε)Â), whose gradient vanishes once ρ has left [1 − ε, 1 + ε] in the direction Â favours.

All three are GRPO (``lab.grpo``: group-normalized advantages, the same loss code) with only ``num_iterations`` and
``clip`` changed, so they sample the same number of completions. Each logs, per rollout, the ratio's spread over
its updates (``ratio/max``, ``ratio/min``, ``ratio/std``) and ``kl/old``, the KL(π_θ‖π_old) it reached
(``lab.onpolicy.RatioMeter``).
"""

from __future__ import annotations

ATTEMPTS = (
    ("1. policy gradient", {"num_iterations": 1, "clip": True}),
    ("2. importance sampling, no clip", {"clip": False}),
    ("3. PPO clip", {"clip": True}),
)
# The ladder's default: arith's built-in model with LoRA, at the default lr, with 8 passes over each rollout for
# attempts 2 and 3: enough reuse that the unclipped ratio runs away. The held-out evaluation runs at the last step.
DEFAULTS = {"task": "arith", "steps": 20, "lr": 1e-3, "num_iterations": 8, "kl_every": 0}
CURVES = ("reward/mean", "kl/old", "ratio/max", "ratio/min", "ratio/std", "clip/frac")


def attempt_configs(**overrides) -> list[tuple[str, object]]:
    """(name, GRPOConfig) of the three attempts: ``DEFAULTS`` updated by ``overrides`` (any GRPOConfig field), with
    attempt 1 at μ = 1 and attempt 2 at ``clip=False``."""
    from lab.grpo import GRPOConfig

    base = {**DEFAULTS, **overrides}
    base.setdefault("eval_every", base["steps"])  # evaluate once, after the last step
    return [(name, GRPOConfig(**{**base, **changes})) for name, changes in ATTEMPTS]


def run_ladder(**overrides) -> dict[str, list[dict]]:
    """Train the three attempts one after the other; returns {attempt name: the metrics of every step}.

    ``overrides``: GRPOConfig fields for all three (``task``, ``steps``, ``lr``, ``num_iterations`` = μ of attempts 2
    and 3, ``out``, ``seed``...). The same seed gives the three the same prompts and the same first rollout."""
    from lab.grpo import train

    return {name: list(train(cfg)) for name, cfg in attempt_configs(**overrides)}


def ladder_table(curves: dict[str, list[dict]]) -> list[dict]:
    """One row per attempt: the held-out score after the last step (``eval/accuracy`` or ``eval/gold_reward``), the
    mean reward of the last quarter of the rollouts, the extremes of the ratio over the run (``ratio/max``,
    ``ratio/min``), the mean of ``ratio/std`` and of ``kl/old`` per rollout, the largest ``kl/old`` and
    ``clip/frac``. None where the run logged none."""

    def values(history, key):
        return [m[key] for m in history if key in m]

    def reduce(history, key, how):
        found = values(history, key)
        return how(found) if found else None

    def mean(xs):
        return sum(xs) / len(xs)

    rows = []
    for name, history in curves.items():
        tail = history[-max(1, len(history) // 4) :]
        held_out = values(history, "eval/accuracy") or values(history, "eval/gold_reward")
        rows.append(
            {
                "attempt": name,
                "eval": held_out[-1] if held_out else None,
                "reward": reduce(tail, "reward/mean", mean),
                "ratio_max": reduce(history, "ratio/max", max),
                "ratio_min": reduce(history, "ratio/min", min),
                "ratio_std": reduce(history, "ratio/std", mean),
                "kl_old": reduce(history, "kl/old", mean),
                "kl_old_max": reduce(history, "kl/old", max),
                "clip_frac": reduce(history, "clip/frac", max),
            }
        )
    return rows


COLUMNS = (  # key, header, format
    ("eval", "held-out", "8.3f"),
    ("reward", "reward", "7.3f"),
    ("ratio_max", "max ρ", "8.3g"),
    ("ratio_min", "min ρ", "7.2g"),
    ("ratio_std", "std ρ", "6.3f"),
    ("kl_old", "kl/old", "7.4f"),
    ("kl_old_max", "max kl/old", "10.4f"),
    ("clip_frac", "max clip", "8.3f"),
)


def format_table(rows: list[dict]) -> str:
    """The ladder's table as fixed-width text: held-out score, reward of the last quarter, max and min ratio, mean
    ratio std and kl/old per rollout, largest kl/old and clip fraction."""
    widths = [int(fmt.split(".")[0]) for _, _, fmt in COLUMNS]
    header = f"{'attempt':32}" + "".join(f" {title:>{w}}" for (_, title, _), w in zip(COLUMNS, widths))
    lines = [header]
    for row in rows:
        cells = [
            format(row[key], fmt) if row[key] is not None else f"{'-':>{w}}"
            for (key, _, fmt), w in zip(COLUMNS, widths)
        ]
        lines.append(f"{row['attempt']:32} " + " ".join(cells))
    return "\n".join(lines)
