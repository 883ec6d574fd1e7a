"""Two processes on the CPU (gloo), launched by torchrun, against one process on the same global batch.

One ``torchrun --nproc_per_node 2`` launch runs ``tests/dist_worker.py``: a GRPO step (LoRA, token-mean loss, KL
in the reward) and a DPO step (full fine-tuning, microbatches of one pair) on a fixed batch, a 3-step SFT run that
rank 1 alone interrupts with SIGINT, and ``python -m lab train rm`` through the CLI. The same GRPO and DPO steps
then run here, in one process. The summed gradients, the trained weights and the logged metrics must match, and
the records must be written once, by rank 0. A second launch, under FSDP, runs DPO, GRPO and REINFORCE in full
fine-tuning against one process the same way, then one step of each other trainer, whose checkpoints must load in
one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import dist
from lab.config import ConfigError
from lab.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
# per-process by design (lab.dist): distinct-n pools the completions of one process only
PER_PROCESS = ("time/", "memory/", "diversity/distinct_")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(the 2-process results per method and rank, the 1-process results, the 2-process output folder)."""
    out = tmp_path_factory.mktemp("two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*command, str(WORKER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = {(m, r): torch.load(out / f"{m}-rank{r}.pt") for m in ("grpo", "dpo") for r in (0, 1)}

    sys.path.insert(0, str(WORKER.parent))
    try:
        import dist_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    single = tmp_path_factory.mktemp("one")
    one = {"grpo": dist_worker.run_grpo(single), "dpo": dist_worker.run_dpo(single)}
    return two, one, out, single, proc


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_two_processes_take_the_step_of_one(launched, method):
    """The gradient each optimizer step uses (summed over the 2 processes, every loss divided by global counts)
    equals one process's on the whole batch to 1e-5; so do the weights after the steps, on both ranks. GRPO takes
    two steps on its rollout, the second at a ratio ≠ 1."""
    two, one, *_ = launched
    rank0, rank1, single = two[(method, 0)], two[(method, 1)], one[method]
    assert len(rank0["grads"]) == len(single["grads"]) == {"grpo": 2, "dpo": 1}[method]  # optimizer steps
    for two_step, one_step, other_rank in zip(rank0["grads"], single["grads"], rank1["grads"]):
        assert len(two_step) == len(one_step) > 0
        assert max(float(g.abs().max()) for g in one_step) > 1e-3  # a real gradient, not zeros any sum would match
        for g2, g1 in zip(two_step, one_step):
            assert _close(g2, g1) < 1e-5
        for g0, g1 in zip(two_step, other_rank):
            assert torch.equal(g0, g1)  # the all-reduced gradient is the same on both ranks
    for name, w in single["weights"].items():
        assert _close(rank0["weights"][name], w) < 1e-5, name
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name  # the replicas stay equal


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_metrics_are_reduced_as_one_process_computes_them(launched, method):
    """Token- and sequence-weighted means over both processes (reward/std and length/correct from the gathered
    rewards, kl/ref and entropy over every token) equal the one-process numbers, in the record too."""
    two, one, out, single, _ = launched
    logged = json.loads((out / "runs" / method / "metrics.jsonl").read_text().splitlines()[0])
    alone = one[method]["metrics"][0]
    compared = [k for k in alone if not k.startswith(PER_PROCESS)]
    assert {"grad/norm", "kl/ref"} <= set(compared)
    for key in compared:
        assert two[(method, 0)]["metrics"][0][key] == pytest.approx(alone[key], abs=1e-5), key
        assert two[(method, 1)]["metrics"][0][key] == pytest.approx(alone[key], abs=1e-5), key  # every rank
        assert logged[key] == pytest.approx(alone[key], abs=1e-5), key


def test_the_record_is_written_once_by_rank_0(launched):
    """One folder per run, each complete: config, status, one metrics line per step, samples as one process
    writes them, a final checkpoint; rank 1 wrote nothing."""
    _, _, out, single, proc = launched
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["dpo", "grpo", "rm", "sft"]
    for name in ("grpo", "dpo", "rm"):
        status = json.loads((runs / name / "status.json").read_text())
        assert status["status"] == "completed" and status["steps"] == 1
        assert json.loads((runs / name / "config.json").read_text())["steps"] == 1
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1]
        assert (runs / name / "checkpoints" / "final").is_dir()
    for name in ("grpo", "dpo"):  # rank 0's samples, once: the same rows one process logs
        two_samples = (runs / name / "samples.jsonl").read_text().splitlines()
        one_samples = (single / "runs" / name / "samples.jsonl").read_text().splitlines()
        assert len(two_samples) == len(one_samples) > 0
    assert proc.stdout.count("status   completed") == 1  # the CLI's summary: printed by rank 0 only


def test_sigint_on_one_rank_stops_every_rank(launched):
    """Rank 1 alone got SIGINT after step 1 of 3: both ranks stopped after step 1 (else rank 0 would wait for
    rank 1 forever at step 2), and rank 0's record says ``stopped`` with one step and a checkpoint."""
    _, _, out, _, proc = launched
    run = out / "runs" / "sft"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and status["steps"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "checkpoints" / "final").is_dir()
    assert "SIGINT: stopping after step 1" in proc.stderr


def test_shard_is_contiguous_and_refuses_an_uneven_batch(monkeypatch):
    """Rank r of N keeps rows [r·B/N, (r+1)·B/N): the shards in rank order are the global batch."""
    rows = list(range(6))
    assert dist.shard(rows) == rows  # one process: the identity
    monkeypatch.setenv("WORLD_SIZE", "3")
    shards = []
    for r in range(3):
        monkeypatch.setenv("RANK", str(r))
        shards.append(dist.shard(rows))
    assert shards == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ConfigError, match=r"^batch_size: 4 rows do not split evenly over 3 processes"):
        dist.shard(rows[:4])
    with pytest.raises(ConfigError, match=r"^minibatch_size: 8 does not split evenly over 3 processes"):
        dist.per_process(8, "minibatch_size")
    assert dist.per_process(9, "minibatch_size") == 3


def test_what_fsdp_does_not_run_is_refused_in_one_line(monkeypatch):
    """DeepSpeed, an FSDP strategy other than FULL_SHARD / SHARD_GRAD_OP, FSDP for LoRA or QLoRA, for a method
    that is not a trainer, or with resume: each stops in one line naming what works, before any model is sharded.
    Every trainer in full fine-tuning passes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"^accelerate config: DeepSpeed is not supported"):
        dist.init()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match=r"^accelerate config: fsdp_sharding_strategy HYBRID_SHARD is not supp"):
        dist.init()
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    assert dist.fsdp_reshard_after_forward() is False  # ZeRO-2: the weights stay gathered from forward to backward
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP 2 configs say it directly
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    assert dist.fsdp_reshard_after_forward() is True
    works = r"FSDP runs full fine-tuning \(mode=full\)"
    with pytest.raises(ConfigError, match=rf"^accelerate config: {works} of sft, .*, ppo, not bon; launch without"):
        dist.check_fsdp("bon", "full")  # a method the registry does not know (lab.methods)
    with pytest.raises(ConfigError, match=rf"^accelerate config: {works}, not mode=lora; LoRA and QLoRA train data"):
        dist.check_fsdp("ppo", "lora")
    with pytest.raises(ConfigError, match=rf"^accelerate config: {works}, not mode=qlora; LoRA and QLoRA"):
        dist.shard_model(torch.nn.Linear(2, 2), "qlora")
    with pytest.raises(ConfigError, match=r"^resume: a run under FSDP saves full weights"):
        dist.check_fsdp("sft", "full", resume="run-1")
    for method in METHODS:  # what works passes: every trainer in full fine-tuning
        dist.check_fsdp(method, "full")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: FSDP asked for or not, nothing is sharded
    layer = torch.nn.Linear(2, 2)
    assert not dist.fsdp() and dist.shard_model(layer, "lora") is layer


@pytest.fixture(scope="module")
def sharded(launched, tmp_path_factory):
    """(the 2-process FSDP results per method and rank, the 1-process results, the FSDP output folder): DPO, GRPO
    and REINFORCE in full fine-tuning under ``ACCELERATE_USE_FSDP=true`` (what ``accelerate launch --use_fsdp``
    sets), then one step each of sft-preferred, csft, rm and PPO (``"trainers"``: their gathered weights)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_FSDP": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*command, str(WORKER), str(out), "fsdp"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    methods = ("grpo", "dpo", "reinforce", "trainers")
    two = {(m, r): torch.load(out / f"{m}-rank{r}.pt") for m in methods for r in (0, 1)}
    import dist_worker  # imported by `launched`

    _, one, *_ = launched
    alone = tmp_path_factory.mktemp("one-full")
    one = {
        "dpo": one["dpo"],
        "grpo": dist_worker.run_grpo(alone, mode="full"),
        "reinforce": dist_worker.run_reinforce(alone),
    }
    return two, one, out


@pytest.mark.parametrize("method", ["grpo", "dpo", "reinforce"])
def test_fsdp_full_fine_tuning_takes_the_step_of_one_process(sharded, method):
    """Weights, gradients and AdamW states sharded over 2 processes (FULL_SHARD); GRPO samples its rollout with the
    weights gathered. The gathered gradient of every optimizer step equals one process's to 1e-5, and so do the
    gathered weights after the steps, wherever the step-1 gradient is above 1e-6: AdamW's first step is
    lr·g/(|g|+eps), eps = 1e-8, so a gradient of 1e-9 moves its weight by a fraction of lr that its last rounding
    bits decide (the ranks sum in another order than one process). The metrics match one process's too, but
    rewards/accuracy: at step 1 π = π_ref, so every DPO margin is a tie of rounding errors."""
    two, one, _ = sharded
    rank0, rank1, single = two[(method, 0)], two[(method, 1)], one[method]
    assert len(rank0["grads"]) == len(single["grads"]) == {"grpo": 2, "dpo": 1, "reinforce": 1}[method]
    for two_step, one_step, other_rank in zip(rank0["grads"], single["grads"], rank1["grads"]):
        assert len(two_step) == len(one_step) == len(single["weights"])  # every weight trains
        assert max(float(g.abs().max()) for g in one_step) > 1e-4  # well above the tolerance: a real gradient
        for g2, g1 in zip(two_step, one_step):
            assert _close(g2, g1) < 1e-5
        for g0, g1 in zip(two_step, other_rank):
            assert torch.equal(g0, g1)
    moved = 0
    for (name, w), g in zip(single["weights"].items(), single["grads"][0]):
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
        assert _close(rank0["weights"][name], w) < 2 * 1e-2, name  # no AdamW step exceeds lr = 1e-2 (plus decay)
        big = g.abs() > 1e-6
        moved += int(big.sum())
        if big.any():
            assert _close(rank0["weights"][name][big], w[big]) < 1e-5, name
    assert moved > 1000
    alone = single["metrics"][0]
    compared = [k for k in alone if not k.startswith(PER_PROCESS) and k != "rewards/accuracy"]
    assert {"grad/norm", "kl/ref"} <= set(compared)
    for key in compared:
        assert rank0["metrics"][0][key] == pytest.approx(alone[key], abs=1e-5), key


@pytest.mark.parametrize("method", ["grpo", "dpo", "reinforce"])
def test_an_fsdp_checkpoint_loads_in_one_process(sharded, method):
    """Rank 0 saved the gathered full state dict: the final checkpoint loads as an ordinary model in one process,
    and holds the weights the 2 processes trained, sharded."""
    from lab.modeling import load_causal_lm

    two, _, out = sharded
    model = load_causal_lm(str(out / "runs" / method / "checkpoints" / "final"), device="cpu")
    loaded = dict(model.named_parameters())
    assert loaded.keys() >= two[(method, 0)]["weights"].keys()
    for name, w in two[(method, 0)]["weights"].items():
        assert torch.equal(loaded[name].detach(), w), name
    status = json.loads((out / "runs" / method / "status.json").read_text())
    assert status["status"] == "completed" and status["steps"] == 1


def test_every_other_trainer_runs_sharded_and_saves_a_checkpoint_one_process_loads(sharded):
    """sft-preferred, csft, rm (a trunk and a scalar head) and PPO (a policy and a value model, both sharded) each
    ran one step under FSDP. Each record is written once, by rank 0, and says FULL_SHARD; each final checkpoint
    loads in one process with exactly the weights the 2 processes trained: the policy, the reward model's trunk
    and head, PPO's value trunk (``value/``) and head (``value_head.pt``)."""
    from lab.modeling import load_causal_lm
    from lab.rm import _load_saved_scalar

    two, _, out = sharded
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["dpo", "grpo", "reinforce", "sft-preferred", "csft", "rm", "ppo"]
    )
    trained, other_rank = two[("trainers", 0)], two[("trainers", 1)]
    for name in ("sft-preferred", "csft", "rm", "ppo"):
        status = json.loads((runs / name / "status.json").read_text())
        assert status["status"] == "completed" and status["steps"] == 1, name
        assert status["summary"]["fsdp"] == "FULL_SHARD" and status["summary"]["processes"] == 2, name
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1], name
        for part, w in trained[name].items():  # the gathered weights: the same on both ranks
            assert w.keys() == other_rank[name][part].keys()
            assert all(torch.equal(v, other_rank[name][part][k]) for k, v in w.items()), (name, part)

    def equal(loaded: dict, expected: dict) -> None:
        assert loaded.keys() >= expected.keys() and expected
        for key, w in expected.items():
            assert torch.equal(loaded[key].detach(), w), key

    for name in ("sft-preferred", "csft", "ppo"):
        model = load_causal_lm(str(runs / name / "checkpoints" / "final"), device="cpu")
        equal(dict(model.named_parameters()), trained[name]["policy"])
    reward_model = _load_saved_scalar(str(runs / "rm" / "checkpoints" / "final"), device="cpu")
    equal(dict(reward_model.named_parameters()), trained["rm"]["model"])
    assert {"head.weight", "head.bias"} <= trained["rm"]["model"].keys()
    final = runs / "ppo" / "checkpoints" / "final"
    value = trained["ppo"]["value"]
    trunk = load_causal_lm(str(final / "value"), device="cpu")
    equal(dict(trunk.named_parameters()), {k.removeprefix("lm."): w for k, w in value.items() if k.startswith("lm.")})
    equal(
        torch.load(final / "value_head.pt"),
        {k.removeprefix("head."): w for k, w in value.items() if k.startswith("head.")},
    )
    assert not torch.equal(value["head.weight"], torch.zeros_like(value["head.weight"]))  # the zero head trained
