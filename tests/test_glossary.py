"""The README's glossary of logged metrics and the names the trainers log are the same set.

Every method runs one step on a built-in task (configs chosen so that every conditional metric shows up: bandit for
the exact metrics, β > 0 for GRPO's shaped reward and fixed point, a ptx term for PPO, ...), and best-of-N scores
a few samples; the names in their metrics.jsonl lines, plus best-of-N's namespaced results, are compared with the
names in the first column of the glossary's tables, both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

# (method, config): one step each. A metric logged only under some setting needs a run here with that setting.
RUNS = [
    ("sft", {"task": "arith", "batch_size": 4, "kl_prompts": 2, "eval_size": 4}),
    ("rm", {"task": "reviews", "batch_size": 4, "eval_pairs": 64, "mode": "lora", "lora_r": 4, "lora_alpha": 8}),
    ("dpo", {"task": "bandit", "batch_size": 8}),  # exact eval/* on an enumerable task
    ("dpo", {"task": "reviews", "batch_size": 4, "eval_size": 2, "kl_samples": 1, "kl_prompts": 2}),  # sampled
    ("sft-preferred", {"task": "bandit", "batch_size": 8}),
    ("reinforce", {"task": "arith", "batch_size": 8, "eval_size": 4}),  # length/correct on a verifiable task
    ("csft", {"task": "reviews", "batch_size": 4, "eval_size": 2, "kl_samples": 1}),
    ("grpo", {"task": "bandit", "batch_size": 4, "group_size": 2, "beta": 0.5, "eval_size": 4}),
    ("grpo", {"task": "arith", "reward_mode": "process", "batch_size": 2, "group_size": 2, "eval_size": 2}),
    (
        "ppo",
        {
            "task": "reviews",
            "reward": "gold",
            "batch_size": 4,
            "num_minibatches": 1,
            "ptx_coef": 0.5,
            "ptx_batch_size": 2,
            "eval_size": 2,
        },
    ),
]


def glossary_names(text: str) -> set[str]:
    """The backticked names in the first column of every table under '## Glossary of logged metrics'."""
    section = text.split("## Glossary of logged metrics", 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    names = set()
    for line in section.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2 and not set(cells[1].strip()) <= {"-", " "}:
            names.update(re.findall(r"`([^`]+)`", cells[1]))
    return names


def test_glossary_names_reads_the_first_column_only():
    text = (
        "## Glossary of logged metrics\n\n| metric | meaning | healthy |\n| --- | --- | --- |\n"
        "| `a/b`, `c` | uses `d` | `e` |\n\n## Next\n| `f` | x | y |\n"
    )
    assert glossary_names(text) == {"a/b", "c"}


def test_every_method_runs_here():
    from lab.methods import METHODS

    assert set(METHODS) <= {method for method, _ in RUNS}, "a method without a run in RUNS: its metrics go unchecked"


@pytest.fixture(scope="module")
def logged_names(tmp_path_factory) -> set[str]:
    from lab.baselines import BestOfNConfig, run_best_of_n
    from lab.methods import get_method

    out = tmp_path_factory.mktemp("glossary")
    for i, (method, fields) in enumerate(RUNS):
        cls, train = get_method(method)
        list(train(cls(steps=1, out=str(out), run_id=f"{i}-{method}", **fields)))
    names = {key for path in out.glob("*/metrics.jsonl") for line in open(path) for key in json.loads(line)}
    rm_run = out / f"{[m for m, _ in RUNS].index('rm')}-rm"
    best = run_best_of_n(BestOfNConfig(reward_model=str(rm_run), n=2, rounds=1, eval_size=2))
    return names | {key for key in best if "/" in key}


def test_the_glossary_documents_exactly_the_logged_metrics(logged_names):
    documented = glossary_names(README.read_text())
    undocumented = sorted(logged_names - documented)
    unlogged = sorted(documented - logged_names)
    assert not undocumented and not unlogged, (
        f"logged but missing from the README glossary: {undocumented or 'none'}\n"
        f"in the README glossary but logged by none of the runs in tests/test_glossary.py: {unlogged or 'none'} "
        "(add a run whose config logs it to RUNS, or take it out of the glossary)"
    )
