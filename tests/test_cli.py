"""The command line, in subprocesses like a user would run it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.records import load_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout
    )


def test_eval_arith_json_reports_base_accuracy_in_range():
    out = run_cli("eval", "--task", "arith", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.30 <= result["accuracy"] <= 0.70 and result["n"] == 200


def test_train_sft_writes_run_into_out(tmp_path):
    out = run_cli(
        "train",
        "sft",
        "--task",
        "arith",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-size",
        "4",
        "--out",
        str(tmp_path),
        "--run-id",
        "cli-sft",
    )
    assert out.returncode == 0, out.stderr
    run = load_run(tmp_path / "cli-sft")
    assert run.status["status"] == "completed" and len(run.metrics) == 2
    assert run.config["batch_size"] == 4 and run.config["method"] == "sft"
    assert "status   completed" in out.stdout  # the end-of-run summary
    listing = run_cli("runs", "--out", str(tmp_path))
    assert "cli-sft" in listing.stdout and "completed" in listing.stdout


def test_bad_flag_value_is_one_line_error():
    out = run_cli("train", "sft", "--lr", "7", "--steps", "1")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: lr: must be in [1e-07, 1.0], got 7.0"


def test_unknown_task_and_offline_model_are_one_line_errors():
    out = run_cli("eval", "--task", "poetry")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "built-in tasks: arith" in out.stderr
    out = run_cli("eval", "--task", "arith", "--model", "someone/not-here")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Built-in models:" in out.stderr


def test_run_id_cannot_escape_runs_folder(tmp_path):
    out = run_cli("train", "sft", "--steps", "1", "--out", str(tmp_path), "--run-id", "../escape")
    assert out.returncode != 0
    assert not (tmp_path.parent / "escape").exists()


def test_sigkill_leaves_a_readable_record(tmp_path):
    """A training run killed with SIGKILL mid-way: the lab's reader still loads every flushed step."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab",
            "train",
            "sft",
            "--task",
            "arith",
            "--steps",
            "500",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
            "--run-id",
            "killed",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = load_run(tmp_path / "killed")
    assert len(run.metrics) >= 3 and run.interrupted
    assert [m["step"] for m in run.metrics] == list(range(1, len(run.metrics) + 1))


def test_generate_prints_scored_completions():
    out = run_cli("generate", "--task", "arith", "--n", "3", "--greedy", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert len(rows) == 3 and all(r["prompt"].endswith("=") for r in rows)
    a, b = rows[0]["prompt"][:-1].split("+")
    assert rows[0]["reward"] == float(rows[0]["completion"] == str(int(a) + int(b)))


def test_pretrain_is_seeded_and_writes_a_loadable_model(tmp_path):
    """Two short pretraining runs with the same seed give identical weights that load like a hub model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("a", "b"):
        out = run_cli("pretrain", "bandit", "--steps", "3", "--seed", "0", "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert AutoTokenizer.from_pretrained(tmp_path / "a").eos_token is not None
