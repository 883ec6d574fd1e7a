"""The app, served in-process on a free port and driven through its named API endpoints with gradio_client,
plus the pieces of ``lab.live`` it stands on (per-token KL, value coercion, error messages).

Output order of /launch: status, progress, plot, samples, metrics, before/after summary, before/after table,
sample picker (the tab's state is not sent to API callers).
"""

import json
import math
import re
import time

import pytest
import torch

pytest.importorskip("gradio_client")

STATUS, PROGRESS, PLOT, SAMPLES, METRICS, BA_TEXT, BA_TABLE, PICK = range(8)
# A run small enough for a test: 2 GRPO steps of 2 prompts × 2 completions, 4 held-out prompts.
SHORT_GRPO = dict(
    method="grpo", task="arith", grpo_steps=2, grpo_batch_size=2, grpo_group_size=2, grpo_eval_size=4, grpo_eval_every=0
)


def app_held_out() -> int:
    import app

    return app.HELD_OUT  # picker value of the first held-out before/after row


@pytest.fixture(scope="module")
def served(tmp_path_factory, free_port):
    import app

    runs = tmp_path_factory.mktemp("runs")
    port = free_port()
    demo = app.serve(port=port, runs_dir=str(runs), prevent_thread_lock=True, warm=False)
    try:
        yield f"http://127.0.0.1:{port}/", runs
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False)


@pytest.fixture(scope="module")
def other_client(served):
    """A second browser tab; the failing launches go here so the first tab keeps its trained policy."""
    from gradio_client import Client

    return Client(served[0], verbose=False)


@pytest.fixture(scope="module")
def short_run(client):
    """One short GRPO run through /launch, shared by the tests that inspect its outputs."""
    return client.predict(**SHORT_GRPO, api_name="/launch")


def test_short_run_returns_metrics_samples_and_before_after(short_run, served):
    status, metrics = short_run[STATUS], short_run[METRICS]
    assert "completed after 2 steps" in status, status
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # the GRPO step's own numbers, each finite
        for key in ("reward/mean", "loss/policy", "entropy", "completion/length"):
            assert math.isfinite(m[key]), (key, m)
        assert 0.0 <= m["reward/mean"] <= 1.0  # arith's gold reward is 0 or 1
    # the record on disk says the same
    run_dir = next(p for p in served[1].iterdir() if p.name.startswith("grpo"))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    # the charts (SVG, as sent to the browser) hold one line per logged metric, and reward against KL
    charts = short_run[PLOT]
    for name in ("reward/mean", "loss/policy", "entropy", "kl/ref", "reward against KL"):
        assert f">{name}<" in charts or f"> {name}<" in charts, name
    # the sample table shows the last sampled step with its rewards
    table = short_run[SAMPLES]  # an HTML table: step, prompt, completion, then the logged numbers
    assert all(f"<th>{name}</th>" in table for name in ("step", "prompt", "completion", "reward"))
    steps = re.findall(r"<tr>\s*<td>(\d+)</td>", table)
    assert steps and set(steps) == {"2"}
    # before/after: 8 held-out prompts, each with both rewards; the summary's difference is after − before
    ba = short_run[BA_TABLE]
    assert len(ba["data"]) == 8
    before = [row[2] for row in ba["data"]]
    after = [row[4] for row in ba["data"]]
    diff = sum(after) / 8 - sum(before) / 8
    assert f"{diff:+.3f}" in short_run[BA_TEXT]


def test_out_of_range_value_is_a_message(other_client):
    """lr must be in [1e-7, 1] (BaseConfig); 5 comes back as the config's one-line error, not an exception."""
    out = other_client.predict(method="grpo", grpo_lr=5.0, api_name="/launch")
    assert "lr: must be in [1e-07, 1.0], got 5.0" in out[STATUS]
    assert "Traceback" not in out[STATUS]
    out = other_client.predict(method="grpo", grpo_group_size=1, api_name="/launch")
    assert "group_size: must be ≥ 2" in out[STATUS]  # GRPOConfig.__post_init__ says why


def test_missing_hub_model_offline_is_one_line(other_client):
    out = other_client.predict(**{**SHORT_GRPO, "model": "nobody-here/no-such-model"}, api_name="/launch")
    status = out[STATUS]
    assert "nobody-here/no-such-model" in status and "Built-in models" in status
    assert "\n" not in status and "Traceback" not in status


def test_bad_jsonl_upload_names_the_row(other_client, tmp_path):
    from gradio_client import handle_file

    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n')
    checked = other_client.predict(handle_file(str(path)), api_name="/check_data")
    assert "row 2 (line 2 of prefs.jsonl)" in checked and "invalid JSON" in checked
    out = other_client.predict(
        method="sft", data_file=handle_file(str(path)), model="arith", sft_steps=1, api_name="/launch"
    )
    assert "row 2 (line 2 of prefs.jsonl)" in out[STATUS]


def test_out_of_memory_is_a_message_and_the_app_keeps_serving(other_client, served, monkeypatch):
    """A trainer that runs out of memory mid-run: the tab gets one line saying what to lower, the run's record
    says "failed", and the next launch works."""
    import lab.methods

    real = lab.methods.get_method

    def oom_train(cfg, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
        yield  # a generator, like every trainer

    monkeypatch.setattr(
        lab.methods, "get_method", lambda name: (real(name)[0], oom_train) if name == "grpo" else real(name)
    )
    out = other_client.predict(**{**SHORT_GRPO, "grpo_run_id": "oom-run"}, api_name="/launch")
    assert out[STATUS].count("out of memory") == 1 and "batch_size" in out[STATUS]
    assert json.loads((served[1] / "oom-run" / "status.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    out = other_client.predict(**{**SHORT_GRPO, "grpo_steps": 1}, api_name="/launch")
    assert "completed after 1 steps" in out[STATUS]


def test_tabs_do_not_share_state(client, short_run, served):
    """A fresh client is a new browser tab: it has no run to stop and no policy to compare, while the first
    tab has both."""
    from gradio_client import Client

    fresh = Client(served[0], verbose=False)
    assert fresh.predict(api_name="/stop") == "No run is going in this tab."
    text, _, _ = fresh.predict(8, api_name="/before_after")
    assert "no trained policy in this tab" in text
    text, table, _ = client.predict(2, api_name="/before_after")
    assert "Mean reward on 2 held-out prompts" in text and len(table["data"]) == 2


def test_per_token_view_after_a_run(client, short_run):
    spans, table, note = client.predict(0, "KL to reference", api_name="/tokens")
    assert spans and table["data"], note
    kl = [row[3] for row in table["data"]]
    assert all(row[3] == pytest.approx(row[1] - row[2], abs=2e-4) for row in table["data"])  # kl = lp − ref lp
    assert f"{sum(kl):+.3f}"[:-1] in note  # Σ_t kl_t is reported (to 3 decimals; last digit may round)
    spans, table, note = client.predict(app_held_out(), "KL to reference", api_name="/tokens")
    assert spans and table["data"][-1][0] == "</s>", note  # a held-out answer of the tuned policy, eos included


def test_stop_ends_the_run_as_stopped_and_the_next_tab_waits_its_turn(client, other_client, served):
    """One training job at a time: while this tab's run goes, another tab's launch waits in the queue, and
    starts once Stop has ended the first run (status "stopped", record complete)."""
    from gradio_client.utils import Status

    job = client.submit(**{**SHORT_GRPO, "grpo_steps": 200}, api_name="/launch")
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the first step is on screen
        outs = job.outputs()
        if any(isinstance(o[PLOT], str) and "<svg" in o[PLOT] for o in outs):  # metrics travel as charts
            break
        time.sleep(0.1)
    waiting = other_client.submit(**SHORT_GRPO, api_name="/launch")
    time.sleep(1.0)
    assert waiting.status().code == Status.IN_QUEUE and waiting.status().rank == 0
    ack = client.predict(api_name="/stop")
    assert ack.startswith("Stopping after the current step (step ")
    result = job.result(timeout=60)
    steps = len(result[METRICS])
    assert 0 <= steps - int(re.search(r"step (\d+)", ack).group(1)) <= 1  # the step it was in, or the next one
    assert f"stopped after {steps} steps" in result[STATUS] and 1 <= steps < 200
    statuses = [json.loads((p / "status.json").read_text()) for p in served[1].iterdir()]
    assert any(s["status"] == "stopped" and s["steps"] == steps for s in statuses)
    assert "completed after 2 steps" in waiting.result(timeout=60)[STATUS]


def test_past_runs_overlay(client, short_run):
    choices, table = client.predict([], api_name="/runs")
    assert table["data"], "the short run is listed"
    run_id = next(row[0] for row in table["data"] if row[1] == "grpo")
    overlay, diff, answers = client.predict([run_id], api_name="/overlay")
    assert run_id in overlay and "<svg" in overlay


# ----------------------------------------------------------------------------------------------------------------------
# lab.live on its own


def test_token_kl_sums_to_the_sequence_log_ratio(tiny_model_dir):
    """Σ_t (log π_θ − log π_ref) over the completion equals log π_θ(y|x) − log π_ref(y|x) computed by the
    other log-prob path (right-padded PairBatch through lab.batching), and is exactly 0 before training
    (LoRA's B matrix starts at zero, so adapters on = adapters off)."""
    from lab.batching import encode_pairs, sequence_logprob
    from lab.live import token_kl
    from lab.modeling import load_policy

    policy = load_policy(tiny_model_dir, mode="lora", lora_r=4, device="cpu")
    prompt, completion = "w3 w4 w5", "w6 w7"
    assert all(t["kl"] == 0.0 for t in token_kl(policy, prompt, completion))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    tokens = token_kl(policy, prompt, completion)
    assert [t["token"] for t in tokens] == ["w6", "w7", "</s>"]
    batch = encode_pairs(policy.tokenizer, [prompt], [completion])
    with torch.no_grad():
        lp, _ = sequence_logprob(policy.model.eval(), batch)
        with policy.reference() as ref:
            ref_lp, _ = sequence_logprob(ref, batch)
    assert sum(t["kl"] for t in tokens) == pytest.approx(float(lp - ref_lp), abs=1e-4)
    assert abs(sum(t["kl"] for t in tokens)) > 1e-3  # the perturbation did move the policy


def test_coerce_turns_widget_values_into_config_types():
    from lab.config import ConfigError
    from lab.live import coerce
    from lab.sft import SFTConfig

    assert coerce(SFTConfig, {"steps": 3.0, "lr": "0.01", "run_id": "", "per_sequence": "true"}) == {
        "steps": 3,
        "lr": 0.01,
        "run_id": None,
        "per_sequence": True,
    }
    with pytest.raises(ConfigError, match="steps: must be a whole number"):
        coerce(SFTConfig, {"steps": 2.5})
    with pytest.raises(ConfigError, match="nonsense: not a setting"):
        coerce(SFTConfig, {"nonsense": 1})


def test_user_messages_are_one_line():
    from lab.config import ConfigError
    from lab.live import user_message

    oom = user_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"))
    assert oom.startswith("out of memory") and "batch_size" in oom and "\n" not in oom
    assert user_message(ConfigError("beta: must be ≥ 0, got -1")) == "beta: must be ≥ 0, got -1"
    assert user_message(RuntimeError("boom\nstack")) == "RuntimeError: boom"


def test_every_widget_starts_at_its_config_default(tmp_path):
    """What the panels send untouched builds exactly the dataclass defaults, for every method: an optional number
    left empty stays None (not 0), a three-state bool stays None, an int stays an int."""
    import dataclasses

    import app
    from lab.live import SHARED_FIELDS, coerce
    from lab.methods import available, get_method

    demo = app.build_app(str(tmp_path))
    widgets = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for method in available():
        cls, _ = get_method(method)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in SHARED_FIELDS]
        sent = {name: widgets[f"{method}-{name}"].value for name in names}
        built = cls(**coerce(cls, sent))
        expected = cls()
        for name in names:
            assert getattr(built, name) == getattr(expected, name), (method, name)
            assert type(getattr(built, name)) is type(getattr(expected, name)), (method, name)


def test_step_inspector_shows_the_last_step_token_by_token(client, short_run):
    """/inspect on the short run: its last step's completions, each token a clickable span with its numbers."""
    run_id = re.search(r"record `[^`]*/([^/`]+)`", short_run[STATUS]).group(1)
    html, note = client.predict(run_id, "", api_name="/inspect")
    assert "<b>step 2</b>" in html and html.count("data-tok='0'") >= 4, note  # 2 prompts × 2 completions
    assert "ratio" in html and "Click a token" in note
    html, note = client.predict(run_id, "7", api_name="/inspect")
    assert html == "" and "step: run" in note and "not 7" in note


def test_runs_filter_compare_and_delete(client, short_run, served):
    _, table = client.predict([], "grpo", "arith", "all", api_name="/runs")
    headers = table["headers"]
    assert {"reward", "gold", "kl/ref"} <= set(headers) and all(row[1] == "grpo" for row in table["data"])
    run_ids = [row[0] for row in table["data"]][:2]
    overlay, diff, answers = client.predict(run_ids, api_name="/overlay")
    assert "reward against KL" in overlay and "<svg" in overlay
    assert answers["data"] and len(answers["headers"]) >= 3  # prompt, π_ref, then one column per run
    _, table = client.predict([], "all", "all", "failed", api_name="/runs")
    failed = [row[0] for row in table["data"]]
    if failed:  # the out-of-memory run of another test
        note, _, table = client.predict(failed, "all", "all", "failed", api_name="/delete_runs")
        assert "Deleted" in note and not table["data"]
        assert not (served[1] / failed[0]).exists()


def test_experiment_runs_its_runs_and_overlays_them(client, monkeypatch):
    """A one-click experiment (here a tiny one in the place of reinforce-vs-grpo) trains each run in turn and
    overlays them."""
    import app
    from lab.experiments import Experiment, RunSpec

    tiny = {"task": "arith", "steps": 1, "batch_size": 2, "group_size": 2, "eval_size": 4, "eval_every": 0}
    runs = (RunSpec("GRPO β=0", "grpo", {**tiny, "beta": 0.0}), RunSpec("GRPO β=0.1", "grpo", {**tiny, "beta": 0.1}))
    tiny_experiment = Experiment("reinforce-vs-grpo", "two tiny runs", "Look. Then look.", runs)
    monkeypatch.setitem(app.EXPERIMENTS, "reinforce-vs-grpo", tiny_experiment)
    text, charts = client.predict("reinforce-vs-grpo", api_name="/experiment")
    assert text.startswith("Done: GRPO β=0, GRPO β=0.1") and "Look." in text
    assert "GRPO β=0 ·" in charts and "GRPO β=0.1 ·" in charts
