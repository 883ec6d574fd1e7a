"""A user's mistake prints one line, never a traceback (issue 13, section 1).

Each case runs ``python -m lab ...`` in this process (the ``lab_cli`` fixture) and checks three things: exit code 2,
exactly one line on stderr (``error: ...``) naming what is wrong, and no half-written run folder. A run that never
started leaves no folder at all; a run that started and then hit the mistake (a NaN reward, a full disk) leaves a
complete record whose status is ``failed`` with the same one-line reason.

Data-side cases (types, rows, roles) are in tests/test_bad_inputs_data.py.
"""

import errno
import json
import shutil
from pathlib import Path

import pytest

import lab.records
from lab.errors import UserError
from lab.records import RunRecord, load_run

FAST = ("--steps", "1", "--batch-size", "2", "--eval-size", "1", "--max-new-tokens", "4")


def assert_one_line(out, *needles: str) -> str:
    """Exit code 2, one stderr line starting with 'error:', holding every needle. Returns the line."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_no_run(out_dir: Path) -> None:
    """No run folder (nor anything else) under --out: a run that never started leaves nothing behind."""
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# Run ids and --out: refused before the model loads


@pytest.mark.parametrize("run_id", ["../x", "/tmp/x", "my run"])
def test_bad_run_id(lab_cli, tmp_path, run_id):
    out = lab_cli("train", "grpo", "--steps", "1", "--out", tmp_path / "runs", "--run-id", run_id)
    assert_one_line(out, f"run id {run_id!r}", "letters, digits")
    assert_no_run(tmp_path / "runs")
    assert not (tmp_path / "x").exists()


def test_existing_run_id(lab_cli, tmp_path):
    RunRecord.create(tmp_path, "taken", {"method": "grpo"}).finish("completed")
    before = (tmp_path / "taken" / "status.json").read_text()
    out = lab_cli("train", "grpo", "--steps", "1", "--out", tmp_path, "--run-id", "taken")
    assert_one_line(out, "already exists", "choose another run id")
    assert (tmp_path / "taken" / "status.json").read_text() == before  # the old run is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_runs_with_a_path_as_id(lab_cli, tmp_path):
    assert_one_line(lab_cli("runs", "../../etc", "--out", tmp_path), "run id '../../etc'")
    assert_one_line(lab_cli("runs", "no-such-run", "--out", tmp_path), "no run folder")


def test_out_is_an_existing_file(lab_cli, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    out = lab_cli("train", "grpo", "--steps", "1", "--out", tmp_path / "afile")
    assert_one_line(out, "afile is a file, not a folder")
    out = lab_cli("train", "grpo", "--steps", "1", "--out", tmp_path / "afile" / "runs")
    assert_one_line(out, "which is a file")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_out_not_writable(lab_cli, tmp_path, monkeypatch):
    # the tests may run as root, whom chmod does not stop: deny write access where the check asks for it
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = lab.records.os.access
    monkeypatch.setattr(lab.records.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    out = lab_cli("train", "grpo", "--steps", "1", "--out", locked / "runs")
    assert_one_line(out, "cannot write to", "permission denied")
    assert_no_run(locked)


def test_api_refuses_the_same_targets_and_leaves_nothing(tmp_path):
    """RunRecord.create runs the CLI's check too, so the Python API and the app refuse the same inputs."""
    (tmp_path / "afile").write_text("")
    for out, run_id in ((tmp_path, "../x"), (tmp_path / "afile", None), (tmp_path / "afile" / "sub", "r")):
        with pytest.raises(UserError):
            RunRecord.create(out, run_id, {"method": "grpo"})
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


# ----------------------------------------------------------------------------------------------------------------------
# A full disk


def _full_disk_for(monkeypatch, prefix: str) -> None:
    """Writes in lab.records to files whose name starts with `prefix` fail as on a full disk (ENOSPC)."""
    real_open = open

    def full_open(file, *args, **kwargs):
        if Path(file).name.startswith(prefix):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(lab.records, "open", full_open, raising=False)


def test_full_disk_while_logging(lab_cli, tmp_path, monkeypatch):
    _full_disk_for(monkeypatch, "metrics.jsonl")
    out = lab_cli("train", "sft", *FAST, "--out", tmp_path, "--run-id", "full")
    line = assert_one_line(out, "no space left on the disk", "metrics.jsonl")
    run = load_run(tmp_path / "full")  # the record is still right: readable, finished, with the reason
    assert run.status["status"] == "failed" and "no space left" in run.status["error"]
    assert run.config["method"] == "sft" and run.metrics == [] and run.bad_lines == 0
    assert line.removeprefix("error: ") in run.status["error"]


def test_full_disk_at_create_leaves_no_folder(tmp_path, monkeypatch):
    _full_disk_for(monkeypatch, ".status.json")  # config.json is written, then status.json fails
    with pytest.raises(lab.records.DiskFull, match="no space left"):
        RunRecord.create(tmp_path, "r", {"method": "grpo"})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# Rewards


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    """python:bad_rewards_13:NAME rewards that return NaN, inf or a constant."""
    (tmp_path / "bad_rewards_13.py").write_text(
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def inf(prompts, completions, **kw):\n    return [1.0] + [float('inf')] * (len(completions) - 1)\n"
        "def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:bad_rewards_13"


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_reward_not_finite(lab_cli, tmp_path, reward_module, kind):
    out = lab_cli(
        "train",
        "grpo",
        *FAST,
        "--group-size",
        "2",
        "--reward",
        f"{reward_module}:{kind}",
        "--out",
        tmp_path / "runs",
        "--run-id",
        "r",
    )
    assert_one_line(out, f"{kind}' returned {kind} for completion", "a reward must be a finite number")
    run = load_run(tmp_path / "runs" / "r")  # it started, so its record is complete, and says why it failed
    assert run.status["status"] == "failed" and "finite number" in run.status["error"]


# ----------------------------------------------------------------------------------------------------------------------
# Models and tokenizers: one line naming the problem, before any run folder


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(lab_cli, tmp_path, model_copy, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 8)
    out = lab_cli("train", "grpo", "--steps", "1", "--model", model_copy, "--out", tmp_path / "runs")
    assert_one_line(out, str(weights), "truncated or corrupt")
    assert_no_run(tmp_path / "runs")


def test_tokenizer_without_pad_or_eos(lab_cli, tmp_path, model_copy):
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = model_copy / name
        if file.exists():
            config = json.loads(file.read_text())
            config.pop("pad_token", None), config.pop("eos_token", None)
            file.write_text(json.dumps(config))
    out = lab_cli("train", "grpo", "--steps", "1", "--model", model_copy, "--out", tmp_path / "runs")
    assert_one_line(out, "neither a pad token nor an eos token")
    assert_no_run(tmp_path / "runs")


def test_chat_rows_without_chat_template(lab_cli, tmp_path, tiny_model_dir, reward_module):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": [{"role": "user", "content": f"w{i} w{i + 1}"}]}) + "\n" for i in range(4))
    )
    out = lab_cli(
        "train",
        "grpo",
        "--steps",
        "1",
        "--task",
        f"jsonl:{data}",
        "--model",
        tiny_model_dir,
        "--reward",
        f"{reward_module}:one",
        "--out",
        tmp_path / "runs",
    )
    assert_one_line(out, "no chat template")
    assert_no_run(tmp_path / "runs")


# ----------------------------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("seed", ["-5", "99999999999"])
def test_seed_out_of_range(lab_cli, tmp_path, seed):
    assert_one_line(lab_cli("train", "grpo", "--steps", "1", "--seed", seed, "--out", tmp_path), "seed")
    assert_no_run(tmp_path)


def test_unknown_task_is_named(lab_cli, tmp_path):
    out = lab_cli("train", "grpo", "--steps", "1", "--task", "nosuchtask", "--out", tmp_path)
    line = assert_one_line(out, "unknown task 'nosuchtask'", "built-in tasks: arith")
    assert "gold" not in line
    assert_no_run(tmp_path)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (
            ["train", "grpo", "--beta", "abc"],
            ["--beta", "invalid float value: 'abc'", "python -m lab train grpo --help"],
        ),
        (["train", "grpo", "--bogus-flag"], ["unrecognized arguments: --bogus-flag", "--help"]),
        (["train", "grpo", "--betta", "0.1"], ["did you mean --beta?"]),
        (["train", "nosuchmethod"], ["invalid choice: 'nosuchmethod'", "grpo", "python -m lab train --help"]),
        (["nosuchcommand"], ["invalid choice: 'nosuchcommand'", "python -m lab --help"]),
    ],
)
def test_argparse_errors_are_one_line(lab_cli, argv, needles):
    assert_one_line(lab_cli(*argv), *needles)


# ----------------------------------------------------------------------------------------------------------------------
# One type to catch


def test_every_user_error_is_one_type():
    """The CLI and the app catch UserError; each module's error type is one, and still the built-in it was."""
    from lab.config import ConfigError
    from lab.data import DataError
    from lab.live import user_errors
    from lab.modeling import BadModelFiles, ModelNotFound
    from lab.rewards import RewardSpecError, RewardValueError
    from lab.tasks import UnknownTaskError

    kinds = [
        ConfigError,
        DataError,
        ModelNotFound,
        BadModelFiles,
        UnknownTaskError,
        RewardSpecError,
        RewardValueError,
        lab.records.RunTargetError,
        lab.records.RunNotFound,
        lab.records.DiskFull,
    ]
    assert all(issubclass(kind, UserError) for kind in kinds)
    assert issubclass(ModelNotFound, OSError) and issubclass(ConfigError, ValueError)
    assert UserError in user_errors()


def test_cuda_on_a_machine_without_a_gpu_is_one_line(lab_cli):
    """Not torch's "AssertionError: Torch not compiled with CUDA enabled" from deep inside the first load."""
    import torch

    from lab.config import ConfigError
    from lab.grpo import GRPOConfig

    assert not torch.cuda.is_available()  # the tests hide every GPU (tests/conftest.py)
    with pytest.raises(ConfigError, match="^device: cuda was asked for, but torch sees no CUDA GPU"):
        GRPOConfig(device="cuda")
    out = lab_cli("train", "sft", "--steps", "1", "--device", "cuda:0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no CUDA GPU" in out.stderr


def test_app_refuses_a_taken_run_id_before_loading(tmp_path, monkeypatch):
    """The app checks the run target when Launch is pressed, before a model loads and without a new folder."""
    import lab.runner
    from lab import live
    from lab.errors import UserError

    (tmp_path / "taken").mkdir()
    monkeypatch.setattr(lab.runner, "load_for", lambda *a, **k: pytest.fail("the model was loaded"))
    session = live.Session()
    with pytest.raises(UserError, match="already exists; choose another run id"):
        live.start(session, "grpo", {"task": "arith", "steps": 1, "out": str(tmp_path), "run_id": "taken"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
