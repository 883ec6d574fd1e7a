"""Resuming a run: a run killed (SIGKILL) or stopped after a checkpoint, then resumed, logs the same metrics as the
run that was never interrupted; the checks a resumed config passes; a trainer that says where it writes."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lab.config import ConfigError
from lab.records import RunRecord, load_run
from lab.runner import ShuffledBatches, start

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

# A CLI run that SIGKILLs itself right after logging step KILL_AFTER (its metrics line is on disk, no checkpoint is).
KILLER = """
import os, signal, sys
import lab.runner
log = lab.runner.Run.log
def log_then_die(self, step, metrics, **kw):
    out = log(self, step, metrics, **kw)
    if step == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
lab.runner.Run.log = log_then_die
from lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without the clock and memory readings, which differ between any two runs."""
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "memory/"))} for row in rows]


def test_grpo_killed_after_its_checkpoint_then_resumed_logs_what_an_uninterrupted_run_logs(tmp_path, capsys):
    """GRPO on arith, n = 4 steps, a checkpoint every k = 2: killed with SIGKILL after step 3 (whose line is then
    dropped), resumed with `--resume ID` alone, its metrics equal the uninterrupted run's at every step. Two updates
    per rollout (μ = 2, two minibatches) draw from the trainer's shuffler; sampling from its generator."""
    flags = "--task arith --steps 4 --save-every 2 --batch-size 2 --group-size 4 --num-iterations 2"
    flags = [*flags.split(), "--minibatch-size", "4", "--eval-size", "2", "--eval-every", "0", "--seed", "1"]
    flags += ["--out", str(tmp_path)]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    both = [
        subprocess.Popen(
            [sys.executable, *command, "train", "grpo", *flags, "--run-id", run_id],
            cwd=ROOT,
            env={**ENV, "KILL_AFTER": "3"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, run_id in (([str(killer)], "killed"), (["-m", "lab"], "whole"))
    ]
    codes = [proc.wait(timeout=240) for proc in both]
    assert codes[0] == -9 and codes[1] == 0, both[1].stderr.read()
    killed = load_run(tmp_path / "killed")
    assert killed.interrupted and [m["step"] for m in killed.metrics] == [1, 2, 3]
    assert killed.resumable and killed.checkpoint_step == 2
    from lab.cli import main

    assert main(["runs", "--out", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "interrupted" in listing and "from step 2" in listing and "--resume RUN_ID" in listing

    resumed = subprocess.run(
        [sys.executable, "-m", "lab", "train", "grpo", "--resume", "killed", "--out", str(tmp_path)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {tmp_path / 'killed'} (resumed after step 2)" in resumed.stdout
    after, whole = load_run(tmp_path / "killed"), load_run(tmp_path / "whole")
    assert [m["step"] for m in after.metrics] == [1, 2, 3, 4]  # step 3 of the killed run was dropped, then redone
    assert comparable(after.metrics) == comparable(whole.metrics)
    assert after.status["status"] == "completed" and after.status["resumed"][0]["from_step"] == 2
    assert any(m["grad/norm"] > 0 for m in whole.metrics[2:])  # the resumed steps did train
    assert len(after.samples) == len(whole.samples)
    assert not after.resumable  # no steps left


def _dpo_config(**changes):
    from lab.dpo import DPOConfig

    base = dict(task="reviews", steps=4, batch_size=4, eval_size=2, eval_every=0, kl_samples=2, lr=1e-2, lora_r=4)
    return DPOConfig(**{**base, **changes})


def test_dpo_stopped_then_resumed_in_process_matches_the_whole_run(tmp_path):
    """Stopped after step 2 (its "final" checkpoint holds the trainer state), then resumed through the Python API:
    steps 3 and 4 equal those of a run that was never stopped, data order included."""
    stop = threading.Event()
    first = start("dpo", _dpo_config(out=str(tmp_path), run_id="stopped"), stop=stop)
    for metrics in first:
        if metrics["step"] == 2:
            stop.set()
    assert load_run(first.path).status["status"] == "stopped" and load_run(first.path).resumable

    cfg = _dpo_config().resuming("stopped", out=str(tmp_path))
    assert cfg.steps == 4 and cfg.run_id == "stopped"
    again = start("dpo", cfg)
    assert again.path == first.path and again.resumed_from == 2
    assert [m["step"] for m in again] == [3, 4]
    whole = list(start("dpo", _dpo_config(out=str(tmp_path), run_id="whole")))
    assert comparable(load_run(first.path).metrics) == comparable(load_run(tmp_path / "whole").metrics)
    assert whole[-1]["loss/dpo"] != whole[0]["loss/dpo"]


def test_ppo_resumes_from_latest_dropping_the_lines_logged_after_it(tmp_path):
    """A finished PPO run (adaptive β, two adapters and a value head), copied without its "final" checkpoint: the
    copy goes on from "latest" (step 2), drops steps 3-4 and logs them again, equal to the original."""
    from lab.ppo import PPOConfig

    base = dict(task="reviews", steps=4, save_every=2, batch_size=4, num_minibatches=2, ppo_epochs=2)
    base.update(max_new_tokens=6, eval_size=2, eval_every=0, adaptive_kl=True, beta=0.1, lr=1e-2)
    list(start("ppo", PPOConfig(**base, out=str(tmp_path), run_id="whole")))
    shutil.copytree(tmp_path / "whole", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "checkpoints" / "final")
    resumed = list(start("ppo", PPOConfig.resuming(str(tmp_path / "copy"))))
    assert [m["step"] for m in resumed] == [3, 4]
    whole, copy = load_run(tmp_path / "whole").metrics, load_run(tmp_path / "copy").metrics
    assert comparable(copy) == comparable(whole)
    assert whole[3]["beta"] != 0.1  # the controller's β, carried over the resume


@pytest.mark.parametrize(
    "method, config",
    [
        ("reinforce", dict(task="arith", batch_size=4, baseline="ema", eval_size=2, eval_every=0)),  # a dict carried
        ("rm", dict(task="reviews", batch_size=4, eval_every=0, eval_pairs=4)),  # an LR schedule
    ],
)
def test_state_carried_across_steps_is_resumed(tmp_path, method, config):
    """REINFORCE's running-mean baseline and the reward model's decaying learning rate come back with the run."""
    from lab.methods import get_method

    cls, _ = get_method(method)
    list(start(method, cls(steps=4, save_every=2, out=str(tmp_path), run_id="whole", **config)))
    shutil.copytree(tmp_path / "whole", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "checkpoints" / "final")
    assert [m["step"] for m in start(method, cls.resuming(str(tmp_path / "copy")))] == [3, 4]
    whole = load_run(tmp_path / "whole").metrics
    assert comparable(load_run(tmp_path / "copy").metrics) == comparable(whole)


def test_shuffled_batches_go_on_from_their_state():
    """The state after 3 batches, loaded into a fresh iterator (of another seed), gives the next batches."""
    rows = list(range(10))
    a = ShuffledBatches(rows, 4, seed=0)
    for _ in range(3):
        next(a)
    b = ShuffledBatches(rows, 4, seed=99)
    b.load_state_dict(a.state_dict())
    assert [next(b) for _ in range(5)] == [next(a) for _ in range(5)]


# ----------------------------------------------------------------------------------------------------------------------
# What a resumed config must be


def _fake_run(tmp_path, run_id="old", step=2, steps=5, **config):
    """A finished-looking grpo run folder with a checkpoint at ``step`` (no training needed to check configs)."""
    from lab.grpo import GRPOConfig

    cfg = GRPOConfig(steps=steps, out=str(tmp_path), run_id=run_id, **config)
    record = RunRecord.create(out=tmp_path, run_id=run_id, config={"method": "grpo", **cfg.to_dict()})
    ckpt = tmp_path / run_id / "checkpoints" / "latest"
    ckpt.mkdir(parents=True)
    torch.save({"step": step}, ckpt / "trainer_state.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    record.finish("stopped")
    return cfg


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("resume: ")
    return message


def test_resume_errors_are_one_line(tmp_path):
    from lab.dpo import DPOConfig
    from lab.grpo import GRPOConfig

    _fake_run(tmp_path, group_size=4)
    with pytest.raises(ConfigError) as err:
        GRPOConfig(resume="nope", out=str(tmp_path))
    assert "no run 'nope'" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        GRPOConfig(resume="old", out=str(tmp_path), group_size=8)  # the run had 4
    assert "group_size is 8 here but 4" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        DPOConfig(task="reviews", resume="old", out=str(tmp_path))
    assert "trained with grpo" in _one_line(err)
    with pytest.raises(ConfigError) as err:  # the CLI's path: the method is named before the run's β meets DPO's range
        DPOConfig.resuming("old", out=str(tmp_path))
    assert _one_line(err).startswith("resume: run old was trained with grpo")
    with pytest.raises(ConfigError) as err:
        GRPOConfig.resuming("old", out=str(tmp_path), steps=2)
    assert "at step 2 already" in _one_line(err)
    shutil.rmtree(tmp_path / "old" / "checkpoints")
    with pytest.raises(ConfigError) as err:
        GRPOConfig.resuming("old", out=str(tmp_path))
    assert "no checkpoint to go on from" in _one_line(err)


def test_resuming_keeps_the_runs_settings_and_takes_the_allowed_changes(tmp_path):
    saved = _fake_run(tmp_path, group_size=4, batch_size=3)
    cfg = type(saved).resuming(str(tmp_path / "old"), steps=9, log_every=2)  # by folder
    assert (cfg.group_size, cfg.batch_size, cfg.steps, cfg.log_every) == (4, 3, 9, 2)
    assert cfg.resume == "old" and cfg.out == str(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# Trainers say where they write


def test_start_makes_the_record_before_the_first_step(tmp_path):
    from lab.sft import SFTConfig

    training = start("sft", SFTConfig(task="arith", steps=2, batch_size=2, eval_size=2, out=str(tmp_path)))
    assert training.run_id.startswith("sft-") and training.path == tmp_path / training.run_id
    assert (training.path / "config.json").exists()  # before any next()
    assert load_run(training.path).status["status"] == "running"
    assert [m["step"] for m in training] == [1, 2]
    assert load_run(training.path).status["status"] == "completed"


def test_a_trainer_that_fails_before_its_first_step_leaves_no_folder(tmp_path):
    from lab.sft import SFTConfig

    def broken(cfg, *, stop=None, record=None):
        raise ValueError("the model did not load")
        yield

    training = start(broken, SFTConfig(task="arith", out=str(tmp_path), run_id="broken"))
    assert training.path.exists()
    with pytest.raises(ValueError, match="did not load"):
        next(training)
    assert not training.path.exists()
