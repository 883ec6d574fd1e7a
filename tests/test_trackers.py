"""--report-to: the metrics rows reach TensorBoard (read back with its own event reader) under the JSONL's names,
a resumed run purges the events after its checkpoint, and a tracker that cannot work here fails in one line."""

import importlib.util
import json
import math

import pytest

from lab.config import ConfigError
from lab.records import RunRecord, load_run
from lab.trackers import TRACKERS, check_tracker, open_tracker

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard itself reads the events files."""
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_reports_every_metric_to_tensorboard_under_its_jsonl_name(tmp_path):
    """Two SFT steps with report_to="tensorboard": every number of every metrics.jsonl row is an event of the same
    name and step, equal to float32 precision (TensorBoard stores float32)."""
    from lab.runner import start
    from lab.sft import SFTConfig

    cfg = SFTConfig(task="arith", steps=2, batch_size=2, eval_size=2, out=str(tmp_path), report_to="tensorboard")
    training = start("sft", cfg)
    list(training)
    rows = load_run(training.path).metrics
    scalars = read_scalars(training.path / "tensorboard")
    expected = {(k, row["step"]): v for row in rows for k, v in row.items() if k != "step" and v is not None}
    assert {k for k, _ in expected} == set(scalars) and "loss/sft" in scalars
    for (key, step), value in expected.items():
        assert dict(scalars[key])[step] == pytest.approx(value, rel=1e-6, abs=1e-30)


def test_a_resumed_run_purges_the_events_after_its_checkpoint(tmp_path):
    """Steps 1-3 written, then the run resumed from step 1 writes 2-3 anew: TensorBoard shows the new values once."""
    record = RunRecord.create(out=tmp_path, run_id="r", config={"method": "sft"})
    tracker = open_tracker("tensorboard", record, {"method": "sft"})
    for step in (1, 2, 3):
        tracker.log({"loss/sft": float(step)}, step)
    tracker.close()
    again = open_tracker("tensorboard", record, {"method": "sft"}, resumed_from=1)
    for step in (2, 3):
        again.log({"loss/sft": 10.0 * step}, step)
    again.close()
    assert read_scalars(tmp_path / "r" / "tensorboard")["loss/sft"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_the_record_sends_rows_after_writing_them_and_nonfinite_values_as_they_are(tmp_path):
    """What a tracker gets: the row's numbers (not text), a NaN loss as NaN though metrics.jsonl writes null; a
    tracker that raises is dropped with a warning and the JSONL goes on."""
    got = []

    class Recorder:
        def log(self, metrics, step):
            got.append((step, metrics))

        def close(self):
            got.append("closed")

    class Broken:
        def log(self, metrics, step):
            raise ConnectionError("offline")

        def close(self):
            pass

    record = RunRecord.create(out=tmp_path, run_id="r")
    record.add_tracker(Recorder())
    record.add_tracker(Broken())
    with pytest.warns(UserWarning):
        record.log_metrics(1, {"loss/x": float("nan"), "reward/mean": 0.5, "note": "text"})
    record.log_metrics(2, {"loss/x": 1.0, "reward/mean": 0.25})
    record.finish("completed")
    assert math.isnan(got[0][1]["loss/x"]) and got[0][1]["reward/mean"] == 0.5 and "note" not in got[0][1]
    assert got[1] == (2, {"loss/x": 1.0, "reward/mean": 0.25}) and got[2] == "closed"
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["loss/x"] is None


def test_an_unavailable_tracker_fails_in_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else find_spec(name))
    with pytest.raises(ConfigError) as err:
        check_tracker("trackio")
    assert str(err.value) == "report_to: trackio is not installed; pip install trackio, or use --report-to none"
    with pytest.raises(ConfigError, match="report_to: must be one of none, tensorboard, trackio, wandb"):
        check_tracker("mlflow")
    assert TRACKERS == ("none", "tensorboard", "trackio", "wandb")


def test_the_cli_refuses_an_unavailable_tracker_before_loading(monkeypatch, capsys, tmp_path):
    from lab.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name))
    assert main(["train", "sft", "--report-to", "wandb", "--out", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "error: report_to: wandb is not installed; pip install wandb, or use --report-to none\n"
    )
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_wandb_without_a_login_fails_in_one_line_and_runs_offline(monkeypatch, tmp_path):
    """Where wandb is installed: no key and not offline is one line; WANDB_MODE=offline writes the run under the
    run folder."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"^report_to: wandb is not logged in; run `wandb login`"):
        check_tracker("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    record = RunRecord.create(out=tmp_path, run_id="r", config={"method": "sft"})
    tracker = open_tracker("wandb", record, {"method": "sft", "lr": 0.1})
    tracker.log({"loss/sft": 0.5}, 1)
    tracker.close()
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_wandb_mode_wandb_does_not_know_is_one_line(monkeypatch):
    """WANDB_MODE=bogus: one line naming the variable, instead of wandb's own validation traceback at start-up."""
    pytest.importorskip("wandb")
    from lab.config import ConfigError
    from lab.trackers import check_tracker

    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ConfigError, match="^report_to: WANDB_MODE='bogus' is not a wandb mode"):
        check_tracker("wandb")
