"""The seed's experiments as data: each one a few runs to overlay, and what to look for in the overlay.

The app launches them with one click; a notebook or a script runs the same definitions:

    from lab.experiments import EXPERIMENTS, run
    run_dirs = run("reinforce-vs-grpo", out="runs")          # trains each run in turn, returns their folders

A run's ``config`` overrides its method's config defaults. A value ``"{rm}"`` stands for the folder of the
experiment's first run (a reward model the later runs are scored by). Steps are kept small: each experiment takes
minutes on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: a label for the legend, a method and its config overrides."""

    label: str
    method: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """A pair, a triple or a sweep of runs, overlaid, with two sentences on what to look for."""

    name: str
    title: str
    look_for: str
    runs: tuple[RunSpec, ...]
    frontier: bool = False  # draw the exact reward–KL frontier (bandit)


_RM = RunSpec("reward model", "rm", {"task": "reviews", "steps": 60, "batch_size": 16, "eval_every": 0})
_PPO = {"task": "reviews", "reward": "{rm}", "steps": 20, "batch_size": 8}
_ARITH = {"task": "arith", "steps": 30, "batch_size": 8, "eval_every": 0}
_PREF = {"task": "reviews", "steps": 30, "batch_size": 16}
_BANDIT = {"task": "bandit", "steps": 40, "kl_mode": "k1_reward"}  # k1_reward: its fixed point is π* (lab.grpo)

EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "overoptimization",
            "Over-optimization: β = 0 vs β = 0.1 against a learned reward model",
            "The proxy reward (the reward model's score) climbs in both runs, while the gold reward of β = 0 "
            "stalls or falls as its KL runs away. With β = 0.1 the KL stays bounded and gold follows the proxy.",
            (_RM, RunSpec("PPO β=0", "ppo", {**_PPO, "beta": 0.0}), RunSpec("PPO β=0.1", "ppo", {**_PPO, "beta": 0.1})),
        ),
        Experiment(
            "reinforce-vs-grpo",
            "REINFORCE vs GRPO: the variance of the gradient",
            "Both start from the same policy and reward; GRPO's group baseline gives a smoother, usually faster "
            "reward curve. REINFORCE's moving baseline leaves noisier steps: look at the spread of reward/mean.",
            (
                RunSpec("REINFORCE", "reinforce", {**_ARITH, "batch_size": 32}),
                RunSpec("GRPO", "grpo", {**_ARITH, "group_size": 4}),
            ),
        ),
        Experiment(
            "dpo-vs-sft-vs-bon",
            "DPO vs SFT on the preferred answers vs conditional SFT",
            "DPO learns from both answers of a pair and moves the policy where the pair differs; SFT on the "
            "preferred answers only imitates the winners, at a larger KL for the same gold reward; conditional SFT "
            "learns both answers behind a good/bad control and answers behind good. Best-of-N "
            "(Train tab, no training) is the reference: its KL is at most log N − (N − 1)/N.",
            (
                RunSpec("DPO", "dpo", dict(_PREF)),
                RunSpec("SFT on preferred", "sft-preferred", dict(_PREF)),
                RunSpec("conditional SFT", "csft", dict(_PREF)),
            ),
        ),
        Experiment(
            "beta-sweep",
            "A β sweep on bandit against the exact π* frontier",
            "Each run's path climbs towards the dashed frontier and settles near its own β's point: small β goes "
            "far from π_ref for a high reward, large β stays close. No policy lies above the frontier: the x axis "
            "is the exact KL (eval/kl_ref, summed over the vocabulary), so a gap below it is a run still on its way.",
            tuple(RunSpec(f"GRPO β={b:g}", "grpo", {**_BANDIT, "beta": b}) for b in (0.1, 0.5, 1.0)),
            frontier=True,
        ),
    )
}


def _ladder() -> tuple[Experiment, ...]:
    """The attempt ladder (``lab.ladder``): policy gradient, importance sampling without a clip, PPO's clip."""
    from lab.ladder import ATTEMPTS, DEFAULTS

    base = {**DEFAULTS, "eval_every": DEFAULTS["steps"]}
    look_for = (
        "Attempt 2 reuses each rollout without a clip: its ratio/max runs away and kl/old climbs, while attempt 1 "
        "(μ = 1) keeps the ratio at exactly 1. At the same reuse, attempt 3's clip keeps the ratio's spread and kl/old "
        "several times smaller (the clip stops the gradient, not the ratio, so ratio/max can still pass 1 + ε)."
    )
    runs = tuple(RunSpec(name, "grpo", {**base, **changes}) for name, changes in ATTEMPTS)
    return (Experiment("attempt-ladder", "The attempt ladder: why PPO clips", look_for, runs),)


EXPERIMENTS.update({e.name: e for e in _ladder()})


def resolve(spec: RunSpec, first_dir: str | None) -> dict:
    """A run's config with ``"{rm}"`` replaced by the folder of the experiment's first run."""
    return {k: (first_dir if v == "{rm}" else v) for k, v in spec.config.items()}


def run(name: str, out: str = "runs", stop=None) -> list[str]:
    """Train every run of experiment ``name`` in turn (recorded under ``out``); returns their folders."""
    from lab.methods import get_method
    from lab.runner import start

    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: unknown {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    dirs: list[str] = []
    for spec in EXPERIMENTS[name].runs:
        cls = get_method(spec.method)[0]
        cfg = cls(**{**resolve(spec, dirs[0] if dirs else None), "out": out})
        training = start(spec.method, cfg, stop=stop)
        for _ in training:
            pass
        dirs.append(str(training.path))
        if stop is not None and stop.is_set():
            break
    return dirs
