"""Bad inputs the Python API must refuse in one line, and faults that must not leave a run silently wrong.

Config fields are checked against their declared types; diverging metrics, degenerate
or oversized data rows, pickled checkpoints, symlinked run folders and SIGTERM each end in a one-line error or a
clean ``stopped`` record. Each case checks that no run folder is left half-written.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from lab.baselines import BestOfNConfig
from lab.config import SEED_RANGE, BaseConfig, ConfigError, field_types
from lab.data import MAX_TEXT_CHARS, DataError, load_rows, take_skipped_rows
from lab.dpo import DPOConfig
from lab.grpo import GRPOConfig
from lab.methods import METHODS, get_method
from lab.records import list_runs, load_run
from lab.runner import Diverged, Run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------------------------------
# 2. types are checked in the Python API as in the CLI


@pytest.mark.parametrize(
    "cls, changes, expected",
    [
        (GRPOConfig, {"trust_remote_code": "false"}, "trust_remote_code: must be true or false (a bool), got 'false'"),
        (GRPOConfig, {"steps": "5"}, "steps: must be a whole number (int), got '5' (str)"),
        (GRPOConfig, {"steps": 1.5}, "steps: must be a whole number (int), got 1.5 (float)"),
        (GRPOConfig, {"steps": True}, "steps: must be a whole number (int), got True (bool)"),
        (GRPOConfig, {"lr": "1e-3"}, "lr: must be a number (float), got '1e-3' (str)"),
        (GRPOConfig, {"scale_rewards": "no"}, "scale_rewards: must be true or false (a bool), got 'no'"),
        (GRPOConfig, {"task": 5}, "task: must be text (str), got 5 (int)"),
        (GRPOConfig, {"group_size": None}, "group_size: needs a value (int), got None"),
        (GRPOConfig, {"seed": -5}, "seed: must be in [0, 4294967295], got -5"),
        (GRPOConfig, {"seed": 99999999999}, "seed: must be in [0, 4294967295], got 99999999999"),
        (DPOConfig, {"task": "reviews", "beta": "0.1"}, "beta: must be a number (float), got '0.1' (str)"),
        (BestOfNConfig, {"reward_model": "x", "seed": "1"}, "seed: must be a whole number (int), got '1' (str)"),
        (BestOfNConfig, {"reward_model": "x", "seed": -1}, "seed: must be in [0, 4294967295], got -1"),
    ],
)
def test_a_wrong_type_or_seed_is_one_line_naming_the_field(tmp_path, cls, changes, expected):
    with pytest.raises(ConfigError) as err:
        cls(**({"out": str(tmp_path / "runs")} if cls is not BestOfNConfig else {}), **changes)
    assert one_line(err).startswith(expected)
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_trust_remote_code_as_text_never_runs_the_models_code(tmp_path):
    """A model folder whose custom code would write a marker: the config is refused before anything loads."""
    model = tmp_path / "evil"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        GRPOConfig(model=str(model), trust_remote_code="false", out=str(tmp_path / "runs"))
    assert not (tmp_path / "ran").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_typed_field_of_every_method_refuses_text(method):
    """The root fix: each int, float and bool field of every config refuses a string, naming the field."""
    config_cls, _ = get_method(method)
    for name, tp in field_types(config_cls).items():
        if tp not in (int, float, bool):
            continue
        with pytest.raises(ConfigError) as err:
            config_cls(**{name: "1"})
        assert one_line(err).startswith(f"{name}: must be"), (method, name, str(err.value))


def test_well_typed_values_still_pass(tmp_path):
    """Ints for floats, a Path for a str field, numpy integers, the CLI's and the app's converted values."""
    cfg = GRPOConfig(lr=1, max_grad_norm=2, out=tmp_path, seed=np.int64(SEED_RANGE[1]), scale_rewards=False)
    assert cfg.out == str(tmp_path) and cfg.lr == 1 and cfg.scale_rewards is False
    assert GRPOConfig().scale_rewards is True and GRPOConfig().batch_size == 8  # None defaults still resolve
    assert DPOConfig(task="reviews").beta == 0.1
    assert dataclasses.replace(GRPOConfig(), steps=3).steps == 3

    from lab.live import coerce

    values = coerce(
        GRPOConfig,
        {
            "steps": 3.0,
            "lr": "0.001",
            "trust_remote_code": False,
            "scale_rewards": "",
            "gradient_checkpointing": "true",
            "seed": 7,
        },
    )
    assert GRPOConfig(**values).gradient_checkpointing is True

    import argparse

    from lab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    args = parser.parse_args(["--steps", "3", "--lr", "1e-3", "--trust-remote-code", "false", "--seed", "5"])
    cfg = config_from_args(GRPOConfig, args)
    assert cfg.steps == 3 and cfg.trust_remote_code is False and cfg.seed == 5


# ----------------------------------------------------------------------------------------------------------------------
# 3a. a run whose loss or gradient norm turns NaN or inf fails, in one line


class Saveable:
    """Stands in for a policy: ``save(dir)`` writes one file."""

    def save(self, path: str) -> None:
        os.makedirs(path)
        Path(path, "weights.txt").write_text("w")


@pytest.mark.parametrize(
    "metric, value", [("loss/policy", float("nan")), ("grad/norm", float("inf")), ("loss/dpo", -float("inf"))]
)
def test_a_non_finite_loss_or_grad_norm_fails_the_run(tmp_path, metric, value):
    cfg = BaseConfig(out=str(tmp_path), run_id="nan", steps=10)
    with pytest.raises(Diverged) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Run(cfg, "sft", save=Saveable()) as run:
            for step in run.steps():
                run.log(step, {"loss/sft": 1.0, metric: value if step == 3 else 0.5})
    assert one_line(err).startswith(f"step 3: {metric} = {value}")
    record = load_run(tmp_path / "nan")
    assert record.status["status"] == "failed" and metric in record.status["error"]
    assert len(record.metrics) == 3 and record.metrics[-1][metric] is None  # the step that diverged is recorded
    assert not (tmp_path / "nan" / "checkpoints" / "last").exists()  # NaN weights are not saved


def test_a_huge_reward_fails_the_run_instead_of_completing(tmp_path):
    """A reward of 3e38 (finite in float64, overflowing in float32 sums): the run ends `failed`, in one line,
    not `completed` with null metrics."""
    (tmp_path / "huge_reward.py").write_text(
        "def reward(prompts, completions, **kw):\n    return [3e38] * len(completions)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from lab.grpo import train

        cfg = GRPOConfig(
            task="arith",
            reward="python:huge_reward:reward",
            steps=3,
            batch_size=2,
            group_size=2,
            eval_every=0,
            eval_size=2,
            out=str(tmp_path / "runs"),
            run_id="huge",
        )
        with pytest.raises(Exception) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            list(train(cfg))
    finally:
        sys.path.remove(str(tmp_path))
    from lab.errors import UserError

    assert isinstance(err.value, UserError), repr(err.value)
    one_line(err)
    run = load_run(tmp_path / "runs" / "huge")
    assert run.status["status"] == "failed" and run.status["error"]


# ----------------------------------------------------------------------------------------------------------------------
# 3b. data: degenerate pairs, unknown roles, oversized text, skipped rows in the record


def write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "Q:", "chosen": " yes", "rejected": " yes"}, "keys 'chosen' and 'rejected' are identical"),
        ({"chosen": "Q: yes", "rejected": "Q: yes"}, "keys 'chosen' and 'rejected' are identical"),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            },
            "keys 'chosen' and 'rejected' are identical",
        ),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "key 'messages[0].role' must be one of system, user"),
        ({"prompt": [{"role": "human", "content": "hi"}], "completion": "x"}, "key 'prompt[0].role' must be one of"),
        ({"prompt": "Q:", "chosen": [{"role": "gpt", "content": "a"}], "rejected": "b"}, "key 'chosen[0].role'"),
    ],
)
def test_a_degenerate_row_is_refused_naming_row_and_key(tmp_path, row, expected):
    path = write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert one_line(err).startswith(f"row 1 (line 1 of {path}): {expected}")


def test_identical_pairs_are_skipped_and_counted_with_skip_bad_rows(tmp_path):
    good = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    path = write(tmp_path / "prefs.jsonl", [good, {"prompt": "Q:", "chosen": " a", "rejected": " a"}, good])
    take_skipped_rows()
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        rows = load_rows(path, skip_bad_rows=True)
    assert len(rows) == 2 and rows.skipped == 1 and take_skipped_rows() == 1 and take_skipped_rows() == 0
    with pytest.warns(UserWarning):
        load_rows(path, skip_bad_rows=True), load_rows(path, skip_bad_rows=True)
    assert take_skipped_rows() == 1  # the same data loaded twice (a check, then the trainer) counts once


def test_tool_and_system_roles_are_accepted(tmp_path):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "tool", "content": "t"},
        {"role": "assistant", "content": "a"},
    ]
    assert load_rows(write(tmp_path / "ok.jsonl", [{"messages": messages}]))[0]["messages"] == messages


def test_a_10mb_line_is_cut_before_tokenizing(tmp_path):
    """Prompts keep their end and completions their start, as token truncation does; loading stays fast."""
    big = "x" * 10_000_000
    path = write(tmp_path / "big.jsonl", [{"prompt": "START" + big + "END", "completion": "BEGIN" + big}])
    started = time.time()
    with pytest.warns(UserWarning, match=f"cut 2 text value.*{MAX_TEXT_CHARS}"):
        rows = load_rows(path)
    assert time.time() - started < 10
    row = rows[0]
    assert len(row["prompt"]) == MAX_TEXT_CHARS and row["prompt"].endswith("END") and rows.cut == 2
    assert len(row["completion"]) == MAX_TEXT_CHARS and row["completion"].startswith("BEGIN")


def test_skipped_rows_are_counted_in_the_run_record(tmp_path):
    from lab.sft import SFTConfig, train

    good = {"prompt": "2+3=", "completion": "5"}
    path = write(tmp_path / "sft.jsonl", [good, {"prompt": "2+3="}, good, good])  # row 2 has no completion
    cfg = SFTConfig(
        task=path,
        model="arith",
        steps=1,
        batch_size=2,
        eval_size=2,
        skip_bad_rows=True,
        out=str(tmp_path / "runs"),
        run_id="skips",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(train(cfg))
    status = load_run(tmp_path / "runs" / "skips").status
    assert status["status"] == "completed" and status["summary"]["skipped_rows"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# 3c. checkpoints are loaded as tensors only


def test_a_pickled_reward_head_does_not_run_code(tmp_path, tiny_model_dir):
    """A full-mode reward-model folder whose scalar_head.pt is a pickle that would write a marker file."""
    import shutil

    import torch

    from lab.modeling import BadModelFiles
    from lab.rm import _load_saved_scalar

    folder = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    torch.save({"weight": Evil()}, folder / "scalar_head.pt")
    with pytest.raises(BadModelFiles) as err:
        _load_saved_scalar(str(folder), device="cpu")
    assert "scalar_head.pt cannot be loaded as plain tensors" in one_line(err)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------------
# 3d. symlinked run folders


def test_symlinked_run_folders_are_skipped_and_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    with Run(BaseConfig(out=str(elsewhere), run_id="real", steps=1), "sft") as run:
        for step in run.steps():
            run.log(step, {"loss/sft": 1.0})
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(elsewhere / "real", target_is_directory=True)
    with pytest.warns(UserWarning, match="skipped 1 symbolic link.*linked"):
        assert list_runs(runs) == []
    with pytest.raises(FileNotFoundError) as err:
        load_run(runs / "linked")
    assert "symbolic link" in one_line(err)


# ----------------------------------------------------------------------------------------------------------------------
# 3e. SIGTERM stops like Ctrl-C, and periodic checkpoints keep a kill's loss small


def test_sigterm_finishes_the_step_and_stops_with_a_checkpoint(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with Run(BaseConfig(out=str(tmp_path), run_id="term", steps=50), "sft", save=Saveable()) as run:
        assert signal.getsignal(signal.SIGTERM) == run._on_sigterm  # else the kill below would end pytest
        for step in run.steps():
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            run.log(step, {"loss/sft": 1.0})
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
    status = load_run(tmp_path / "term").status
    assert status["status"] == "stopped" and status["steps"] == 2 and status["latest_checkpoint"] == "final"
    assert "SIGTERM: stopping after step 2" in capsys.readouterr().err


def test_save_every_replaces_one_latest_checkpoint(tmp_path):
    assert BaseConfig().save_every == 50
    with Run(BaseConfig(out=str(tmp_path), run_id="periodic", steps=7, save_every=2), "sft", save=Saveable()) as run:
        for step in run.steps():
            run.log(step, {"loss/sft": 1.0})
    status = load_run(tmp_path / "periodic").status
    assert status["checkpoints"] == ["latest", "final"]
    assert sorted(p.name for p in (tmp_path / "periodic" / "checkpoints").iterdir()) == ["final", "latest"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_on_a_cli_run_ends_it_after_the_step_with_a_checkpoint(tmp_path, signum):
    """The first SIGTERM or Ctrl-C lets the current step finish (exit 143 or 130): the step counts agree, the last step's
    samples and the after-evaluation are there, and the final checkpoint holds the trainer state to resume from."""
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
            "--eval-size",
            "4",
            "--out",
            str(tmp_path),
            "--run-id",
            "term",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr  # the shell's code for the signal: stopped, not finished
    assert "stopping after" in stderr and "Traceback" not in stderr, stderr
    run = load_run(tmp_path / "term")
    assert run.status["status"] == "stopped" and 2 <= run.steps < 500
    assert run.status["summary"]["steps"] == run.steps == run.metrics[-1]["step"]
    assert "eval" in run.status["summary"]  # SFT's held-out evaluation at the end
    assert max(row["step"] for row in run.samples) == run.steps
    final = tmp_path / "term" / "checkpoints" / "final"
    assert run.status["latest_checkpoint"] == "final" and (final / "trainer_state.pt").is_file()
