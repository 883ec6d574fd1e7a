"""The pure pieces behind the app's lab views: the step inspector's per-token numbers, the exact reward–KL frontier,
the SVG charts, the experiments' definitions, and the runs table (final values, delete, failed runs left behind)."""

import json
import math

import pytest
import torch

# ----------------------------------------------------------------------------------------------------------------------
# lab.inspector: hand-computed per-token terms

GRPO = {"method": "grpo", "epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.1, "kl_mode": "k3"}
ROW = {
    "prompt": "1+1=",
    "tokens": ["a", "b", "c", "d"],
    "logprobs": [-1.0, -2.0, -0.5, -1.0],
    "logprobs_after": [-0.5, -2.0, -1.0, -1.5],
    "ref_logprobs": [-1.0, -1.5, -0.5, -1.0],
    "advantages": [1.0, -0.5, 2.0, -1.0],
}


def test_inspector_terms_by_hand():
    """GRPO, ε_low = 0.2, ε_high = 0.28, β = 0.1, k3:
    a: ρ = e^0.5 = 1.648721, Â = 1 > 0: clip(ρ) = 1.28, term = min(1.6487, 1.28) = 1.28, the clip binds; kl = 0; up.
    b: ρ = 1, term = −0.5, no clip; d = log π_ref − log π_old = 0.5: k3 = e^0.5 − 0.5 − 1 = 0.148721, β·k3 = 0.0148721.
    c: ρ = e^−0.5 = 0.606531, Â = 2: min(1.213061, 0.8·2 = 1.6) = 1.213061, no clip (Â > 0, ρ < 1 + ε); down.
    d: ρ = 0.606531, Â = −1: min(−0.606531, −0.8) = −0.8, the clip binds (Â < 0, ρ < 1 − ε)."""
    from lab.inspector import token_terms

    a, b, c, d = token_terms(ROW, GRPO)
    assert a["ratio"] == pytest.approx(1.648721, abs=1e-6) and a["term"] == pytest.approx(1.28)
    assert a["clipped"] is True and a["kl"] == pytest.approx(0.0) and a["pushed"] == 1
    assert b["ratio"] == pytest.approx(1.0) and b["term"] == pytest.approx(-0.5) and b["clipped"] is False
    assert b["kl"] == pytest.approx(0.148721, abs=1e-6) and b["kl_term"] == pytest.approx(0.0148721, abs=1e-7)
    assert b["pushed"] == 0
    assert c["term"] == pytest.approx(1.213061, abs=1e-6) and c["clipped"] is False and c["pushed"] == -1
    assert d["term"] == pytest.approx(-0.8) and d["clipped"] is True


def test_inspector_other_methods_and_old_records():
    """PPO: symmetric cliprange and k1 (log π_old − log π_ref; b: −2 − (−1.5) = −0.5). REINFORCE: no clip, term
    = ρ·Â (a: 1.648721). A record without the per-token lists gives no terms; one without logprobs_after gives
    None for ρ, the term and the push, and the scalar advantage fills in for missing per-token ones."""
    from lab.inspector import equation, token_terms

    ppo = token_terms(ROW, {"method": "ppo", "cliprange": 0.2, "beta": 0.05})
    assert ppo[0]["term"] == pytest.approx(1.2) and ppo[0]["clipped"] is True
    assert ppo[1]["kl"] == pytest.approx(-0.5) and ppo[1]["kl_term"] == pytest.approx(-0.025)
    no_clip = token_terms(ROW, {"method": "ppo", "clip": False, "epsilon_low": 0.2, "epsilon_high": 0.2})
    assert no_clip[0]["term"] == pytest.approx(1.648721, abs=1e-6) and no_clip[0]["clipped"] is False  # ε = ∞
    assert no_clip[3]["term"] == pytest.approx(-0.606531, abs=1e-6) and no_clip[3]["clipped"] is False
    assert "clip(" not in equation(no_clip[0], {"method": "ppo", "clip": False, "epsilon_low": 0.2})
    reinforce = token_terms(ROW, {"method": "reinforce", "beta": 0.0})
    assert reinforce[0]["term"] == pytest.approx(1.648721, abs=1e-6) and reinforce[0]["clipped"] is False
    assert token_terms({"prompt": "x", "completion": "y"}, GRPO) == []
    old = {"tokens": ["a"], "logprobs": [-1.0], "advantage": 0.5}
    (t,) = token_terms(old, GRPO)
    assert t["ratio"] is None and t["term"] is None and t["pushed"] is None and t["advantage"] == 0.5
    text = equation(token_terms(ROW, GRPO)[0], GRPO)
    assert "1.6487" in text and "clip(ρ, 0.8, 1.28)" in text and "the clip binds" in text


def test_inspector_groups_keep_each_prompts_completions_together():
    from lab.inspector import groups, logged_steps, step_rows

    rows = [{"step": s, "prompt": p} for s, p in [(1, "a"), (1, "b"), (1, "a"), (2, "a")]]
    assert logged_steps(rows) == [1, 2]
    assert groups(step_rows(rows, 1)) == [("a", [0, 2]), ("b", [1])]


# ----------------------------------------------------------------------------------------------------------------------
# lab.fixed_points: the reward–KL frontier


def test_frontier_by_hand_and_its_limits():
    """π_ref = (½, ½), r = (1, 0), β = 1: π* = (e, 1)/(1 + e), so E_π*[r] = e/(1 + e) = 0.731059 and
    KL(π*‖π_ref) = p·log 2p + (1 − p)·log 2(1 − p) = 0.110944. β → ∞ is π_ref itself: (0, ½). Along the sweep the
    reward never falls as the KL grows."""
    from lab.fixed_points import reward_kl_frontier

    ref = torch.tensor([[0.5, 0.5]]).log()
    rewards = torch.tensor([[1.0, 0.0]])
    start, point = reward_kl_frontier(ref, rewards, betas=(1.0,))
    assert start == {"beta": math.inf, "kl": 0.0, "reward": pytest.approx(0.5)}
    p = math.e / (1 + math.e)
    assert point["reward"] == pytest.approx(p, abs=1e-6)
    assert point["kl"] == pytest.approx(p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)), abs=1e-6)
    sweep = reward_kl_frontier(ref, rewards)
    assert all(b["reward"] >= a["reward"] - 1e-9 for a, b in zip(sweep, sweep[1:]))
    assert sweep[-1]["reward"] > 0.99  # β = 0.01 is nearly greedy


# ----------------------------------------------------------------------------------------------------------------------
# lab.charts and the app's chart groups


def test_nice_ticks_and_svg_name_their_axes():
    from lab.charts import Chart, Series, nice_ticks, render

    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(-3.0, 40.0) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3]
    chart = Chart("kl", "step (optimizer updates)", "KL (nats)", [Series("kl/ref", [1, 2, 3], [0.0, 0.1, None])])
    html = render(chart)
    assert "step (optimizer updates)" in html and "KL (nats)" in html and html.count("<polyline") == 1
    assert html.count("<circle") == 2  # the None is no point


def test_mixed_scales_get_their_own_charts(monkeypatch):
    """A panel whose metrics differ more than 10× in size is split; every chart has both axis titles."""
    import app

    history = [{"step": s, "reward/mean": 0.5, "reward/gold": 0.6, "kl/ref": 40.0, "kl/old": 0.01} for s in (1, 2)]
    groups = app.chart_groups({"run": history})
    assert ("reward", ["reward/mean", "reward/gold"]) in groups
    assert ("kl", ["kl/ref"]) in groups and ("kl", ["kl/old"]) in groups
    for chart in app.metric_charts({"run": history}, "grpo"):
        assert chart.x_title and chart.y_title
    monkeypatch.setattr(app, "bandit_frontier", lambda: ({"kl": 0.0, "reward": 0.3}, {"kl": 2.0, "reward": 1.0}))
    reward_kl, gold_kl = app.reward_kl_charts({"run": history}, frontier=True)  # gold beside the proxy
    assert [s.x for s in reward_kl.series] == [[40.0, 40.0], [0.0, 2.0]] and reward_kl.series[1].dash
    assert gold_kl.series[0].y == [0.6, 0.6] and "gold" in gold_kl.title


def test_glossary_healthy_lines_come_from_the_readme(tmp_path):
    from lab.charts import glossary, healthy

    readme = tmp_path / "README.md"
    readme.write_text(
        "## Glossary\n\n**All trainers**\n\n| metric | meaning | healthy |\n| --- | --- | --- |\n"
        "| `grad/norm` | norm | 0.1–1 |\n\n**GRPO** (`lab/grpo.py`)\n\n| metric | meaning | healthy |\n"
        "| --- | --- | --- |\n| `kl/ref`, `kl/old` | KL | climbs slowly |\n"
    )
    table = glossary(readme)
    assert healthy(table, "grpo", "kl/old") == "climbs slowly" and healthy(table, "grpo", "grad/norm") == "0.1–1"
    assert healthy(table, "sft", "nothing") == ""


# ----------------------------------------------------------------------------------------------------------------------
# lab.experiments


def test_every_experiment_builds_valid_configs():
    from lab.experiments import EXPERIMENTS, resolve
    from lab.methods import get_method

    assert {"overoptimization", "reinforce-vs-grpo", "dpo-vs-sft-vs-bon", "beta-sweep"} <= set(EXPERIMENTS)
    for experiment in EXPERIMENTS.values():
        assert len(experiment.runs) >= 2 and experiment.look_for.count(". ") >= 1
        for spec in experiment.runs:
            cls, _ = get_method(spec.method)
            cfg = cls(**resolve(spec, "runs/some-rm"))
            assert cfg.steps <= 60
    assert EXPERIMENTS["overoptimization"].runs[1].config["reward"] == "{rm}"
    assert resolve(EXPERIMENTS["overoptimization"].runs[1], "runs/rm-1")["reward"] == "runs/rm-1"


# ----------------------------------------------------------------------------------------------------------------------
# lab.live: the runs table


def _run(runs, run_id, method, task, status, metrics):
    d = runs / run_id
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"method": method, "task": task, "beta": 0.1, "lr": 1e-3}))
    (d / "status.json").write_text(json.dumps({"status": status, "run_id": run_id, "steps": len(metrics)}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_runs_table_has_final_values_and_deletes(tmp_path):
    from lab import live
    from lab.records import RunTargetError

    metrics = [{"step": 1, "reward/mean": 0.2, "kl/ref": 0.0}, {"step": 2, "reward/mean": 0.7, "kl/ref": 0.4}]
    _run(tmp_path, "a", "grpo", "arith", "completed", metrics + [{"step": 2, "eval/accuracy": 0.9}])
    _run(tmp_path, "b", "grpo", "arith", "running", metrics)
    (row_b, row_a) = live.past_runs(str(tmp_path))
    assert (row_a["reward"], row_a["gold"], row_a["kl/ref"]) == (0.7, 0.9, 0.4)
    assert [r["setting"] for r in live.config_diff(live.load_runs(str(tmp_path), ["a", "b"]))] == []
    with pytest.raises(RunTargetError, match="still running"):
        live.delete_runs(str(tmp_path), ["a", "b"])
    assert (tmp_path / "a").exists()  # nothing is deleted when one of them is refused
    assert live.delete_runs(str(tmp_path), ["a"]) == ["a"] and not (tmp_path / "a").exists()


def test_a_run_refused_before_its_first_step_leaves_no_folder(tmp_path):
    """A bad reward or bad data fails before step 1 with a UserError: the message stays, the folder goes."""
    from lab import live
    from lab.errors import UserError
    from lab.grpo import GRPOConfig

    def bad_reward(cfg, **kwargs):
        raise UserError("reward: no such reward 'nope'")
        yield

    cfg = GRPOConfig(task="arith", out=str(tmp_path), steps=1)
    job = live.Job(method="rm", cfg=cfg, train_fn=bad_reward).start()  # "rm": no policy to load
    job.join(timeout=60)
    assert job.phase == "failed" and job.error == "reward: no such reward 'nope'"
    assert not any(tmp_path.iterdir())


def test_only_a_stopped_or_interrupted_run_is_offered_for_resuming(tmp_path):
    from lab import live
    from lab.records import RunTargetError

    _run(tmp_path, "s", "grpo", "arith", "stopped", [{"step": 1}])
    _run(tmp_path, "c", "dpo", "reviews", "completed", [{"step": 1}])
    assert live.resumable(str(tmp_path), "s") == "grpo"
    with pytest.raises(RunTargetError, match="run c: completed; only a stopped or interrupted run"):
        live.resumable(str(tmp_path), "c")


def test_per_token_view_after_a_reward_model_run_says_why_it_is_empty():
    from types import SimpleNamespace

    import app
    from lab import live

    state = live.Session(job=SimpleNamespace(method="rm", done=True, policy=None))
    spans, _, note = app.on_tokens(state, 0, "KL to reference")
    assert spans == [] and "reward-model run samples no completions" in note


def test_resume_fills_the_train_tabs_method_and_resume_box(tmp_path):
    import app

    _run(tmp_path, "s", "grpo", "arith", "stopped", [{"step": 1}])
    lab_app = app.LabApp(str(tmp_path))
    lab_app.build()
    note, method, *updates = lab_app.on_resume(["s"])
    assert method == "grpo" and "Resuming `s`" in note
    filled = [key for key, u in zip(lab_app.controls, updates) if isinstance(u, dict) and u.get("value") == "s"]
    assert filled == ["grpo_resume"]
    note, *_ = lab_app.on_resume(["s", "t"])
    assert "Tick one" in note


def test_an_experiment_trains_each_run_in_turn_and_feeds_the_first_to_the_rest(tmp_path, monkeypatch):
    """``experiments.run``: every run gets its own record, in order, and ``"{rm}"`` becomes the first run's folder
    (here a reward model that the second run, PPO, is scored by)."""
    from lab import experiments
    from lab.records import load_run

    tiny = experiments.Experiment(
        "tiny",
        "a reward model, then PPO on it",
        "nothing",
        (
            experiments.RunSpec("rm", "rm", {"task": "reviews", "steps": 1, "batch_size": 4, "eval_every": 0}),
            experiments.RunSpec("ppo", "ppo", {"task": "reviews", "reward": "{rm}", "steps": 1, "batch_size": 2}),
        ),
    )
    monkeypatch.setitem(experiments.EXPERIMENTS, "tiny", tiny)
    dirs = experiments.run("tiny", out=str(tmp_path))
    runs = [load_run(d) for d in dirs]
    assert [r.config["method"] for r in runs] == ["rm", "ppo"]
    assert runs[1].config["reward"] == dirs[0]
    assert all(r.status["status"] == "completed" for r in runs)
    with pytest.raises(ValueError, match="unknown 'nope'"):
        experiments.run("nope", out=str(tmp_path))


def test_the_reliability_diagram_bins_both_policies_answers_and_refuses_where_nothing_is_checkable():
    """Before and after hold the 8 answers in their bins; after a LoRA update the two differ. The ECE the chart
    shows is the one ``expected_calibration_error`` gives on the same answers, and a bandit session is refused."""
    import app
    from lab import live
    from lab.diagnostics import answer_confidences, ece_from_bins, expected_calibration_error
    from lab.grpo import GRPOConfig
    from lab.runner import load_for
    from lab.tasks import get_task

    task = get_task("arith")
    policy = load_for(GRPOConfig(task="arith"), task)
    with torch.no_grad():  # move the adapter so π_θ ≠ π_ref
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    bins = live.reliability(live.Session(policy=policy, task=task), n=8)
    assert [sum(b["count"] for b in bins[k]) for k in ("before", "after")] == [8, 8]
    confidences, correct = answer_confidences(policy.model, policy.tokenizer, task, task.eval_prompts()[:8])
    assert ece_from_bins(bins["after"]) == pytest.approx(expected_calibration_error(confidences, correct))
    assert bins["before"] != bins["after"]
    page = app.reliability_html(bins)
    assert "chart-reliability" in page
    assert f"before (π_ref): ECE {ece_from_bins(bins['before']):.3f}" in page
    assert f"after: ECE {ece_from_bins(bins['after']):.3f}" in page
    with pytest.raises(ValueError, match="answers that can be checked"):
        live.reliability(live.Session(policy=policy, task=get_task("bandit")))
    with pytest.raises(ValueError, match="launch a run first"):
        live.reliability(live.Session())


def test_after_conditional_sft_the_app_compares_answers_given_the_good_control():
    """A finished csft run's session answers held-out prompts after its ``good`` control (as the method's own
    evaluation does); the before/after rows show the controlled prompts."""
    from types import SimpleNamespace

    from lab import live
    from lab.csft import CSFTConfig
    from lab.runner import load_for
    from lab.tasks import get_task

    cfg, task = CSFTConfig(task="reviews"), get_task("reviews")
    policy = load_for(cfg, task)
    job = SimpleNamespace(done=True, policy=policy, phase="completed", task=task, method="csft", cfg=cfg)
    session = live.Session(job=job)
    live.finish(session)
    rows, _ = live.compare(session, n=2)
    assert len(rows) == 2 and all(r["prompt"].rstrip().endswith(cfg.good.strip()) for r in rows)
    assert all(r["after_reward"] is not None for r in rows)  # scored by the task's gold reward of the plain prompt


def test_the_apps_resume_goes_on_in_the_stopped_runs_folder_to_its_new_step_count(tmp_path):
    """Stop a GRPO run in the app's job layer after step 2 of 6 (its checkpoint holds the trainer state), then
    launch it again with resume: the same folder ends completed at step 4, its metrics rows 1..4 once each."""
    from lab import live
    from lab.records import load_run

    session = live.Session()
    values = {"task": "arith", "steps": 6, "batch_size": 2, "group_size": 2, "eval_every": 0, "eval_size": 4,
              "out": str(tmp_path), "run_id": "r"}  # fmt: skip
    job = live.start(session, "grpo", values)
    while len(job.history) < 2 and not job.done:
        job.wait(len(job.history), timeout=60)
    job.request_stop()
    job.join(timeout=120)
    assert job.phase == "stopped" and live.resumable(str(tmp_path), "r") == "grpo"
    stopped_at = load_run(tmp_path / "r").steps
    job = live.start(session, "grpo", {"resume": "r", "steps": stopped_at + 2, "out": str(tmp_path)})
    job.join(timeout=120)
    run = load_run(tmp_path / "r")
    assert job.phase == "completed" and run.status["status"] == "completed"
    assert [m["step"] for m in run.metrics] == list(range(1, stopped_at + 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
