"""A shared app (``--share``, or a host other than localhost) refuses server paths, code and remote code, caps
steps per run and one user's queued launches; and the app refuses out-of-range values instead of clamping them.

The policy is a pure function in ``lab.live`` (tested directly), and the app calls it: an app served in shared
mode on localhost is driven through gradio_client as a stranger would.
"""

import json
import time

import pytest

from lab.live import NotServed, Serving, check_queue, check_shared_inputs

pytest.importorskip("gradio_client")

STATUS, METRICS = 0, 4
SERVED = "local paths are not served on a shared app"


# ----------------------------------------------------------------------------------------------------------------------
# The policy, without a browser


@pytest.mark.parametrize(
    "values, message",
    [
        ({"task": "jsonl:/etc/passwd"}, f"task: {SERVED}"),
        ({"task": "jsonl:/no/such/file.jsonl"}, f"task: {SERVED}"),  # the same line: existence is not revealed
        ({"task": "/etc/passwd"}, f"task: {SERVED}"),
        ({"task": "hf:/etc"}, f"task: {SERVED}"),
        ({"ptx_data": "data.jsonl"}, f"ptx_data: {SERVED}"),
        ({"model": "/tmp"}, f"model: {SERVED}"),
        ({"model": "./models/x"}, f"model: {SERVED}"),
        ({"model": "tests"}, f"model: {SERVED}"),  # a bare word that is no built-in model
        ({"reward_model": "/root"}, f"reward_model: {SERVED}"),
        ({"reward": "python:os:getcwd"}, "reward: python: rewards are not served"),
        ({"reward": "gold+python:this:s"}, "reward: python: rewards are not served"),
        ({"reward": "/etc"}, f"reward: {SERVED}"),
        ({"trust_remote_code": True}, "trust_remote_code: remote code is not run on a shared app"),
        ({"steps": 501}, "steps: at most 500 per run on a shared app, got 501"),
    ],
)
def test_shared_policy_refuses_server_paths_code_and_long_runs(values, message):
    with pytest.raises(NotServed) as err:
        check_shared_inputs(values, allow_local=False, max_steps=500)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_shared_policy_message_does_not_depend_on_the_file_existing(tmp_path):
    there = tmp_path / "rows.jsonl"
    there.write_text('{"prompt": "a", "completion": "b"}\n')
    messages = []
    for path in (there, tmp_path / "missing.jsonl"):
        with pytest.raises(NotServed) as err:
            check_shared_inputs({"task": f"jsonl:{path}"})
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    "values",
    [
        {"task": "arith", "model": None, "reward": "gold", "steps": 500, "trust_remote_code": False},
        {"task": "reviews", "reward": "math+format"},
        {"task": "hf:trl-lib/ultrafeedback_binarized"},
        {"task": "hf:gsm8k:main:train"},
        {"model": "Qwen/Qwen2.5-0.5B-Instruct", "reward_model": "openai-community/gpt2"},
        {"model": "arith"},  # a built-in model name
    ],
)
def test_shared_policy_serves_builtin_tasks_hub_ids_and_builtin_rewards(values):
    check_shared_inputs(values, allow_local=False, max_steps=500)


def test_uploads_and_the_apps_own_reward_models_are_served():
    check_shared_inputs({"task": "jsonl:/tmp/gradio/abc/prefs.jsonl"}, served=("jsonl:/tmp/gradio/abc/prefs.jsonl",))
    check_shared_inputs({"reward": "runs/rm-1"}, served=("runs/rm-1",))


def test_allow_local_lets_the_operator_opt_in_but_keeps_the_step_cap():
    check_shared_inputs(
        {"task": "jsonl:/etc/passwd", "reward": "python:os:getcwd", "model": "/tmp", "trust_remote_code": True},
        allow_local=True,
    )
    with pytest.raises(NotServed, match="steps: at most 10"):
        check_shared_inputs({"steps": 11}, allow_local=True, max_steps=10)


def test_a_local_app_refuses_nothing():
    Serving(shared=False).check({"task": "jsonl:/etc/passwd", "reward": "python:os:getcwd", "steps": 10**6})
    assert Serving(shared=False).hidden_fields == ()
    assert Serving(shared=True).hidden_fields == ("trust_remote_code",)
    assert Serving(shared=True, allow_local=True).hidden_fields == ()


def test_queue_cap():
    check_queue(1, 2)
    with pytest.raises(NotServed, match="queue: you already have 2 run"):
        check_queue(2, 2)


def test_shared_when_public_or_not_on_the_loopback():
    import app
    from lab.live import is_shared

    assert not is_shared("127.0.0.1", False) and not is_shared("localhost", False)
    assert is_shared("127.0.0.1", True) and is_shared("0.0.0.0", False)
    parsed = {}
    app.serve, real = (lambda *a, **k: parsed.update(args=a, kwargs=k)), app.serve
    try:
        app.main(["--share", "--allow-local", "--max-steps", "30", "--max-queue", "1"])
    finally:
        app.serve = real
    assert parsed["args"][2] is True
    assert parsed["kwargs"] == {"allow_local": True, "max_steps": 30, "max_queue": 1}


# ----------------------------------------------------------------------------------------------------------------------
# Defect 4: refused, not clamped, rounded or replaced


def test_widget_values_out_of_range_or_empty_are_refused():
    from lab.config import ConfigError
    from lab.grpo import GRPOConfig
    from lab.live import coerce

    with pytest.raises(ConfigError, match=r"steps: needs a value in \[1, 1000000\]"):
        coerce(GRPOConfig, {"steps": None})
    with pytest.raises(ConfigError, match="steps: must be a whole number, got 2.5"):
        coerce(GRPOConfig, {"steps": 2.5})
    with pytest.raises(ConfigError, match=r"temperature: must be in \[0.05, 5.0\], got 999"):
        GRPOConfig(**coerce(GRPOConfig, {"temperature": 999.0}))
    with pytest.raises(ConfigError, match=r"epsilon_low: must be in \[0, 1\).*got -5"):
        GRPOConfig(**coerce(GRPOConfig, {"epsilon_low": -5.0}))


def test_no_config_widget_clamps_or_rounds(tmp_path):
    """Sliders clamp a typed value to their bounds and precision=0 rounds 2.5 to 2: neither is used."""
    import gradio as gr

    import app

    demo = app.build_app(str(tmp_path))
    for block in demo.blocks.values():
        assert not isinstance(block, gr.Slider), f"slider {block.elem_id}"
        if isinstance(block, gr.Number):
            assert block.precision is None and block.minimum is None and block.maximum is None, block.elem_id


def test_more_held_out_prompts_than_the_task_has_are_refused(monkeypatch):
    from lab import live
    from lab.config import ConfigError
    from lab.tasks import TASKS

    session = live.Session(policy=object(), task=TASKS["reviews"])
    with pytest.raises(ConfigError, match=r"held-out prompts: must be in \[1, 10\] \(reviews has that many\), got 32"):
        live.compare(session, n=32)
    with pytest.raises(ConfigError, match=r"held-out prompts: must be in \[1, 6\] \(bandit has that many\), got 7"):
        live.best_of_n(live.Session(), "bandit", "gold", 2, 7)
    with pytest.raises(ConfigError, match="N: must be a whole number, got 2.5"):
        live.best_of_n(live.Session(), "bandit", "gold", 2.5, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Defect 6: best-of-N and a reward model of another task


def _fake_rm_run(runs, run_id: str, task: str):
    run = runs / run_id
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "rm", "task": task}))
    (run / "status.json").write_text(json.dumps({"status": "completed", "steps": 1, "method": "rm"}))
    return run


def test_reward_models_name_their_task_and_a_mismatch_is_refused(tmp_path):
    from lab import live
    from lab.config import ConfigError

    run = _fake_rm_run(tmp_path, "rm-bandit", "bandit")
    if live.reward_models(str(tmp_path)) != [str(run)]:
        pytest.skip("records need more files to list a run")  # the listing's own rules, tested in test_records
    assert live.reward_model_choices(str(tmp_path)) == [("rm-bandit · task bandit", str(run))]
    with pytest.raises(ConfigError, match="reward: the reward model rm-bandit was trained on bandit, not reviews"):
        live.best_of_n(live.Session(), "reviews", str(run), 2, 2)


# ----------------------------------------------------------------------------------------------------------------------
# The app in shared mode, driven as a stranger would


@pytest.fixture(scope="module")
def shared(tmp_path_factory, free_port):
    import app

    runs = tmp_path_factory.mktemp("runs")
    port = free_port()
    demo = app.serve(
        port=port, runs_dir=str(runs), prevent_thread_lock=True, warm=False, shared=True, max_steps=3, max_queue=1
    )
    try:
        yield f"http://127.0.0.1:{port}/", runs
    finally:
        demo.close()


@pytest.fixture(scope="module")
def stranger(shared):
    from gradio_client import Client

    return Client(shared[0], verbose=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "jsonl:/etc/passwd"}, f"task: {SERVED}"),
        ({"task": "jsonl:/etc/no-such-file"}, f"task: {SERVED}"),
        ({"model": "/etc"}, f"model: {SERVED}"),
        ({"method": "reinforce", "reinforce_reward": "python:this:s"}, "reward: python: rewards are not served"),
        ({"grpo_steps": 4}, "steps: at most 3 per run on a shared app, got 4"),
    ],
)
def test_shared_app_refuses_in_one_line(stranger, shared, kwargs, message):
    out = stranger.predict(**{"method": "grpo", **kwargs}, api_name="/launch")
    assert message in out[STATUS] and "\n" not in out[STATUS] and "Traceback" not in out[STATUS]
    assert not any(shared[1].iterdir())  # refused before anything ran or was recorded


def test_shared_app_has_no_remote_code_box(stranger):
    params = {
        p["parameter_name"]
        for p in stranger.view_api(print_info=False, return_format="dict")["named_endpoints"]["/launch"]["parameters"]
    }
    assert "grpo_lr" in params and not any(p.endswith("trust_remote_code") for p in params)


def test_shared_best_of_n_refuses_server_paths(stranger):
    text, _ = stranger.predict("bandit", "/etc", 2, 2, api_name="/best_of_n")
    assert f"reward: {SERVED}" in text


def test_shared_app_caps_one_users_queue(stranger, shared):
    """max_queue=1: a second launch from the same address while the first runs is refused when it is queued."""
    from gradio_client import Client
    from gradio_client.exceptions import ValidationError

    # a run of several seconds (64 completions a step, 200 held-out prompts before and after), so that it is still
    # running on a busy machine when the second launch arrives
    first = stranger.submit(
        method="grpo",
        grpo_steps=3,
        grpo_batch_size=8,
        grpo_group_size=8,
        grpo_eval_size=200,
        grpo_eval_every=0,
        api_name="/launch",
    )
    deadline = time.time() + 60
    while time.time() < deadline and not first.outputs():
        time.sleep(0.1)
    with pytest.raises(ValidationError, match="queue: you already have 1 run"):
        Client(shared[0], verbose=False).predict(method="grpo", grpo_steps=1, api_name="/launch")
    result = first.result(timeout=120)
    assert "after 3 steps" in result[STATUS], result[STATUS]


# ----------------------------------------------------------------------------------------------------------------------
# Defect 2: Stop's reply never overwrites the run's final status


def test_stop_answers_beside_its_button_not_in_the_status(tmp_path):
    import app

    demo = app.build_app(str(tmp_path))
    ids = {b.elem_id: b._id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    (stop,) = [fn for fn in demo.fns.values() if fn.api_name == "stop"]
    assert [o._id for o in stop.outputs] == [ids["stop-note"]]
    (launch,) = [fn for fn in demo.fns.values() if fn.api_name == "launch"]
    assert ids["status"] in [o._id for o in launch.outputs]
