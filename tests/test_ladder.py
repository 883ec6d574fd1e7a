"""The attempt ladder: three GRPO runs that differ only in μ and the clip, on the same samples."""

import pytest
import torch

from lab.ladder import attempt_configs, format_table, ladder_table, run_ladder
from lab.onpolicy import clip_bounds


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_three_attempts_differ_only_in_mu_and_the_clip():
    (_, first), (_, second), (_, third) = attempt_configs(steps=7, num_iterations=5, lr=2e-3)
    assert (first.num_iterations, second.num_iterations, third.num_iterations) == (1, 5, 5)
    assert clip_bounds(second) == (float("inf"), float("inf")) and clip_bounds(third) == (0.2, 0.2)
    same = {k: v for k, v in first.to_dict().items() if k not in ("num_iterations", "clip")}
    for cfg in (second, third):
        assert {k: v for k, v in cfg.to_dict().items() if k not in ("num_iterations", "clip")} == same
    assert first.steps == 7 and first.lr == 2e-3 and first.eval_every == 7  # held-out evaluation after the last step


def test_a_short_ladder_logs_the_ratio_of_every_attempt(tmp_path):
    """Two rollouts each. The three share their first rollout (same seed, same θ). Attempt 1 uses each rollout
    once: ρ = 1 exactly, kl/old = 0. Attempts 2 and 3 reuse it: wherever a group gave a gradient, ρ leaves 1 on both
    sides and kl/old > 0; attempt 2 never clips."""
    curves = run_ladder(
        task="arith",
        steps=2,
        batch_size=2,
        group_size=4,
        num_iterations=3,
        lr=1e-2,
        eval_size=4,
        out=str(tmp_path),
        sample_every=0,
    )
    (pg, pg_run), (is_name, is_run), (_, clip_run) = curves.items()
    assert pg_run[0]["reward/mean"] == is_run[0]["reward/mean"] == clip_run[0]["reward/mean"]
    for m in pg_run:
        assert m["ratio/max"] == m["ratio/min"] == 1.0 and m["ratio/std"] == 0.0 and m["kl/old"] == 0.0
    for run in (is_run, clip_run):
        learning = [m for m in run if m["groups/zero_std_frac"] < 1]  # some group disagreed: a gradient
        assert learning and all(m["ratio/max"] > 1.0 > m["ratio/min"] and m["kl/old"] > 0 for m in learning)
    assert all(m["clip/frac"] == 0.0 for m in is_run)
    rows = ladder_table(curves)
    assert [r["attempt"] for r in rows] == [pg, is_name, "3. PPO clip"]
    assert rows[0]["ratio_max"] == 1.0 and rows[1]["ratio_max"] == max(m["ratio/max"] for m in is_run)
    assert rows[0]["eval"] is not None  # eval/accuracy after the last step
    assert len(format_table(rows).splitlines()) == 4
