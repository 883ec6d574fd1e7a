"""lab.records: the run folder round trip, crash tolerance (torn lines, SIGKILL), path safety, checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.records import RunRecord, list_runs, load_run, safe_run_dir

REPO = Path(__file__).resolve().parents[1]


@dataclass
class GRPOConfig:  # a stand-in method config: records only need a dataclass
    task: str = "arith"
    lr: float = 1e-3
    steps: int = 3


# ---- path safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../x", "/abs", "a/b", "", "..", ".", "a\\b", "a b", ".hidden"])
def test_run_id_cannot_escape_runs_folder(tmp_path, run_id):
    with pytest.raises(ValueError, match="run id"):
        safe_run_dir(tmp_path, run_id)
    with pytest.raises(ValueError, match="run id"):
        RunRecord.create(out=tmp_path, run_id=run_id)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_safe_run_id_accepted(tmp_path):
    with pytest.raises(ValueError, match="run id must be a non-empty string"):
        safe_run_dir(tmp_path, None)
    assert safe_run_dir(tmp_path, "grpo-1.2_x") == tmp_path / "grpo-1.2_x"


# ---- round trip ---------------------------------------------------------------------------------


def test_create_log_finish_round_trip(tmp_path):
    record = RunRecord.create(out=tmp_path / "runs", config=GRPOConfig())
    # default id: <method from the config class>-YYYYmmdd-HHMMSS-<4 hex>
    assert re.fullmatch(r"grpo-\d{8}-\d{6}-[0-9a-f]{4}", record.run_id)
    assert record.path == tmp_path / "runs" / record.run_id

    status = json.loads((record.path / "status.json").read_text())
    assert status["status"] == "running" and status["pid"] == os.getpid() and status["ended"] is None

    record.log_metrics(1, {"loss/policy": torch.tensor(0.5), "reward/mean": np.float32(0.25), "step": 99})
    record.log_metrics(2, {"loss/policy": 0.25, "kl/ref": [1, 2], "n": np.int64(3)})
    record.log_samples(2, [{"prompt": "1+1=", "completion": "2", "reward": torch.tensor(1.0)}])
    record.finish("completed", summary={"reward/mean": np.float64(0.75)})

    run = load_run(record.path)
    assert run.run_id == record.run_id
    assert run.config["task"] == "arith" and run.config["lr"] == 1e-3
    assert run.config["meta"]["method"] == "grpo" and run.config["meta"]["pid"] == os.getpid()
    assert run.config["meta"]["config_class"] == "GRPOConfig"
    assert run.metrics == [
        {"step": 1, "loss/policy": 0.5, "reward/mean": 0.25},  # the step argument wins over a "step" key
        {"step": 2, "loss/policy": 0.25, "kl/ref": [1, 2], "n": 3},
    ]
    assert run.samples == [{"step": 2, "prompt": "1+1=", "completion": "2", "reward": 1.0}]
    assert run.status["status"] == "completed" and run.status["steps"] == 2
    assert run.status["summary"] == {"reward/mean": 0.75}
    assert run.status["ended"] >= run.status["started"]
    assert run.bad_lines == 0 and not run.interrupted

    row = run.summary_row()
    assert row == {
        "id": record.run_id,
        "method": "grpo",
        "task": "arith",
        "status": "completed",
        "steps": 2,
        "started": run.status["started"],
        "metrics": {"loss/policy": 0.25, "kl/ref": [1, 2], "n": 3},
        "resumable": False,  # completed, and no checkpoint
        "checkpoint_step": None,
    }
    with pytest.raises(RuntimeError, match="already finished"):
        record.log_metrics(3, {"loss/policy": 0.1})
    with pytest.raises(RuntimeError, match="already finished"):
        record.finish("failed")


def test_explicit_id_prefix_and_no_reuse(tmp_path):
    assert RunRecord.create(out=tmp_path, config={"method": "dpo"}).run_id.startswith("dpo-")
    assert RunRecord.create(out=tmp_path, prefix="ppo").run_id.startswith("ppo-")
    assert RunRecord.create(out=tmp_path).run_id.startswith("run-")
    RunRecord.create(out=tmp_path, run_id="mine")
    with pytest.raises(ValueError, match="already exists"):
        RunRecord.create(out=tmp_path, run_id="mine")


def test_nonfinite_metrics_become_null_with_one_warning(tmp_path):
    record = RunRecord.create(out=tmp_path, run_id="nan")
    with pytest.warns(UserWarning) as warned:
        record.log_metrics(1, {"loss": float("nan"), "ratio": torch.tensor(float("inf")), "ok": 1.0})
        record.log_metrics(2, {"loss": float("nan")})  # same key again: no second warning
    assert [str(w.message) for w in warned] == [
        "metric 'loss' is nan at step 1; written as null in metrics.jsonl",
        "metric 'ratio' is inf at step 1; written as null in metrics.jsonl",
    ]
    assert warned[0].filename == __file__  # points at the caller's line
    lines = (record.path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": None, "ratio": None, "ok": 1.0}
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]  # strict JSON


def test_metrics_must_be_data(tmp_path):
    record = RunRecord.create(out=tmp_path, run_id="bad")
    with pytest.raises(TypeError, match="loss: cannot write a object"):
        record.log_metrics(1, {"loss": object()})


# ---- crash tolerance ----------------------------------------------------------------------------


def test_torn_last_line_and_corrupt_middle_line(tmp_path):
    record = RunRecord.create(out=tmp_path, run_id="torn")
    for step in range(1, 4):
        record.log_metrics(step, {"loss": 1.0 / step})
    metrics_file = record.path / "metrics.jsonl"
    with open(metrics_file, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # a writer killed mid-line: no closing brace, no newline
    run = load_run(record.path)
    assert [row["step"] for row in run.metrics] == [1, 2, 3]
    assert run.bad_lines == 0  # a torn last line is expected after a kill, not corruption

    lines = metrics_file.read_text().split("\n")
    lines[1] = '{"step": 2, "lo'  # corruption in the middle is counted
    metrics_file.write_text("\n".join(lines))
    run = load_run(record.path)
    assert [row["step"] for row in run.metrics] == [1, 3]
    assert run.bad_lines == 1


_KILLED_WRITER = """
import sys, time
from lab.records import RunRecord
record = RunRecord.create(out=sys.argv[1], run_id="killed", config={"method": "grpo", "task": "arith"})
step = 0
while True:
    step += 1
    record.log_metrics(step, {"loss": 1.0 / step})
    time.sleep(0.01)
"""


def test_sigkill_mid_run_leaves_a_readable_interrupted_record(tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)], env=env, cwd=tmp_path)
    metrics_file = out / "killed" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 60  # generous: a cold interpreter on a busy machine
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics_file.exists() and metrics_file.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the writer exited on its own"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)  # reap it, as a supervising process would
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    run = load_run(out / "killed")
    assert len(run.metrics) >= 3
    assert [row["step"] for row in run.metrics] == list(range(1, len(run.metrics) + 1))
    assert run.status["status"] == "running" and run.status["pid"] == proc.pid
    assert run.interrupted
    assert run.summary_row()["status"] == "interrupted" and run.summary_row()["steps"] == len(run.metrics)


def test_live_run_is_not_interrupted(tmp_path):
    record = RunRecord.create(out=tmp_path, run_id="live")  # this very process is alive
    run = load_run(record.path)
    assert run.status["status"] == "running" and not run.interrupted
    assert run.summary_row()["status"] == "running"


# ---- context manager ----------------------------------------------------------------------------


def test_context_manager_marks_failed_and_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RunRecord.create(out=tmp_path, run_id="fails") as record:
            record.log_metrics(1, {"loss": 1.0})
            raise RuntimeError("boom\nsecond line of detail")
    status = load_run(tmp_path / "fails").status
    assert status["status"] == "failed" and status["error"] == "RuntimeError: boom" and status["steps"] == 1


def test_context_manager_stopped_and_completed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunRecord.create(out=tmp_path, run_id="ctrl-c"):
            raise KeyboardInterrupt
    assert load_run(tmp_path / "ctrl-c").status["status"] == "stopped"

    with RunRecord.create(out=tmp_path, run_id="clean"):
        pass
    assert load_run(tmp_path / "clean").status["status"] == "completed"

    with RunRecord.create(out=tmp_path, run_id="early") as record:
        record.finish("stopped", summary={"why": "asked"})  # finished inside: left as it is
    assert load_run(tmp_path / "early").status["status"] == "stopped"


# ---- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_of_a_tiny_llama_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(config)
    backend = Tokenizer(WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")

    record = RunRecord.create(out=tmp_path, run_id="ckpt")
    path = record.save_checkpoint(model, "step-1", tokenizer=tokenizer)
    assert path == record.path / "checkpoints" / "step-1"
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # a later checkpoint under the same tag replaces the first
    record.save_checkpoint(model, "step-1", tokenizer=tokenizer)
    record.save_checkpoint(model, "final")
    reloaded = LlamaForCausalLM.from_pretrained(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert PreTrainedTokenizerFast.from_pretrained(path)("a b")["input_ids"] == [1, 2]
    assert sorted(p.name for p in (record.path / "checkpoints").iterdir()) == ["final", "step-1"]  # no temp folders

    status = load_run(record.path).status
    assert status["latest_checkpoint"] == "final" and status["checkpoints"] == ["step-1", "final"]


def test_checkpoint_uses_obj_tokenizer_and_save(tmp_path):
    class Tok:
        def save_pretrained(self, path):
            Path(path, "tokenizer.txt").write_text("tok")

    class PolicyLike:  # lab's Policy saves with save(path) and carries .tokenizer
        tokenizer = Tok()

        def save(self, path):
            os.makedirs(path, exist_ok=True)
            Path(path, "weights.txt").write_text("w")

    record = RunRecord.create(out=tmp_path, run_id="policy")
    path = record.save_checkpoint(PolicyLike(), "final")
    assert (path / "weights.txt").read_text() == "w" and (path / "tokenizer.txt").read_text() == "tok"
    with pytest.raises(ValueError, match="checkpoint tag"):
        record.save_checkpoint(PolicyLike(), "../escape")
    with pytest.raises(TypeError, match="neither save_pretrained"):
        record.save_checkpoint(object(), "x")


# ---- listing ------------------------------------------------------------------------------------


def test_list_runs(tmp_path):
    assert list_runs(tmp_path / "missing") == []
    first = RunRecord.create(out=tmp_path, run_id="zzz-first", config={"method": "sft", "task": "reviews"})
    second = RunRecord.create(out=tmp_path, run_id="aaa-second", config={"method": "dpo"})
    first.finish("completed")
    (tmp_path / "not-a-run").mkdir()
    runs = list_runs(tmp_path)
    assert [run.run_id for run in runs] == ["zzz-first", "aaa-second"]  # by start time, not by name
    assert runs[0].summary_row()["method"] == "sft" and runs[0].summary_row()["task"] == "reviews"
    assert runs[1].summary_row()["status"] == "running"
    assert second.path.exists()


# ---- resuming ------------------------------------------------------------------------------------


def _checkpoint(record, tag, step):
    """A checkpoint folder with a trainer state at ``step``, as lab.runner.Run saves it."""
    from lab.records import TRAINER_STATE

    class Weights:
        def save(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "weights.bin").write_bytes(b"w")

    record.save_checkpoint(Weights(), tag, state={"step": step})
    assert (record.path / "checkpoints" / tag / TRAINER_STATE).is_file()


def test_reopen_drops_the_rows_after_the_checkpoint_and_goes_on(tmp_path):
    """Four steps logged, checkpoints at steps 2 (latest) and 3 (last, newer), a torn line at the end: the resume
    point is "last" at 3; reopening keeps rows 1-3 of metrics and samples and logs step 4 after them."""
    from lab.records import find_resume_point

    record = RunRecord.create(out=tmp_path, run_id="r", config=GRPOConfig(steps=6))
    for step in (1, 2, 3, 4):
        record.log_metrics(step, {"loss/policy": step / 10})
        record.log_samples(step, [{"prompt": "p", "completion": str(step)}])
        if step in (2, 3):
            _checkpoint(record, "latest" if step == 2 else "last", step)
    with open(record.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/po')  # killed mid-line
    record.finish("failed", error="boom")

    point = find_resume_point("r", tmp_path)
    assert (point.tag, point.step, point.config["steps"]) == ("last", 3, 6)
    assert load_run(record.path).resumable and load_run(record.path).checkpoint_step == 3
    again = RunRecord.reopen(point.path, point.step, {"task": "arith", "steps": 8})
    assert again.status["status"] == "running" and again.status["pid"] == os.getpid()
    assert "error" not in again.status and again.status["resumed"] == [{"from_step": 3, "at": ANY_TIME}]
    again.log_metrics(4, {"loss/policy": 0.9})
    again.finish("completed")
    run = load_run(record.path)
    assert [(m["step"], m["loss/policy"]) for m in run.metrics] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]
    assert [s["completion"] for s in run.samples] == ["1", "2", "3"]
    assert run.config["steps"] == 8 and run.config["meta"]["resumed"][0]["from_step"] == 3
    assert run.status["checkpoints"] == ["latest", "last"] and run.status["started"] == record.status["started"]


class _AnyTime(str):
    def __eq__(self, other):
        return isinstance(other, str) and bool(re.fullmatch(r"\d{4}-\d\d-\d\dT.*", other))


ANY_TIME = _AnyTime()


def test_a_live_run_cannot_be_resumed(tmp_path):
    from lab.records import ResumeError, find_resume_point

    record = RunRecord.create(out=tmp_path, run_id="r")
    _checkpoint(record, "latest", 1)
    status = json.loads((record.path / "status.json").read_text())
    (record.path / "status.json").write_text(json.dumps({**status, "pid": os.getppid()}))  # alive, not us
    with pytest.raises(ResumeError, match=r"^resume: run r is still running \(pid \d+\); stop it first$"):
        find_resume_point("r", tmp_path)


def test_a_stopped_run_logs_samples_for_its_last_step(tmp_path, monkeypatch):
    """Stop clicked during step 2 of 6 (sample_every 0: only steps 1 and 6 would log samples): step 2 finishes and
    is the run's last, and its samples are in the record, as the app's per-token view needs."""
    import threading

    import lab.grpo
    from lab.grpo import GRPOConfig, train
    from lab.records import load_run

    stop = threading.Event()
    calls = []

    def score_then_stop(*args, **kwargs):  # the stop arrives while step 2 is scoring its rollout
        calls.append(1)
        if len(calls) == 2:
            stop.set()
        return lab.rollout.score(*args, **kwargs)

    monkeypatch.setattr(lab.grpo, "score", score_then_stop)
    cfg = GRPOConfig(
        task="arith",
        steps=6,
        batch_size=2,
        group_size=2,
        sample_every=0,
        eval_every=0,
        out=str(tmp_path),
        run_id="stopped",
    )
    assert [m["step"] for m in train(cfg, stop=stop)] == [1, 2]
    run = load_run(tmp_path / "stopped")
    assert run.status["status"] == "stopped"
    assert sorted({row["step"] for row in run.samples}) == [1, 2]
