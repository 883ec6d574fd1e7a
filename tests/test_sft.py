"""SFT: the loss on hand-computed values, completion-only masking, and short real runs that move the weights."""

import json
import math

import pytest
import torch

from lab.batching import encode_pairs, sequence_logprob, token_logprobs
from lab.config import ConfigError
from lab.modeling import load_policy
from lab.sft import SFTConfig, sft_loss, train


def test_sft_loss_hand_computed():
    """Two rows; row 0 has completion tokens with log-probs ln ½ and ln ¼, row 1 one token with ln ½.
    token mean: −(ln ½ + ln ¼ + ln ½)/3 = (4 ln 2)/3 ≈ 0.924196
    per-sequence: mean(−(ln ½ + ln ¼)/2, −ln ½) = mean(1.5 ln 2, ln 2) = 1.25 ln 2 ≈ 0.866434"""
    logprobs = torch.log(torch.tensor([[0.9, 0.5, 0.25], [0.5, 0.1, 0.1]]))
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx(4 * math.log(2) / 3, abs=1e-6)
    loss_seq, _ = sft_loss(logprobs, mask, per_sequence=True)
    assert loss_seq.item() == pytest.approx(1.25 * math.log(2), abs=1e-6)
    assert metrics["tokens"].item() == 3


def test_prompt_tokens_are_not_targets():
    """Changing the prompt's own tokens' probabilities must not change the loss: only completion positions count."""
    policy = load_policy("arith", mode="lora", device="cpu")
    batch = encode_pairs(policy.tokenizer, ["12+34=", "5+5="], ["46", "10"])
    # completion mask covers the answer digits plus eos, nothing of the prompt
    assert batch.completion_mask.sum(-1).tolist() == [3, 3]
    assert batch.completion_mask[0, :6].sum() == 0
    logprobs, mask = token_logprobs(policy.model, batch)
    total, count = sequence_logprob(policy.model, batch)
    assert torch.allclose(total, (logprobs * mask).sum(-1)) and count.tolist() == [3, 3]
    # naive check: log π(y|x) by scoring each completion token with a full softmax
    with torch.no_grad():
        logits = policy.model(input_ids=batch.input_ids[:1, :9]).logits[0]  # "12+34=46<eos>"
        naive = sum(logits[t - 1].log_softmax(-1)[batch.input_ids[0, t]] for t in range(6, 9))
    assert total[0].item() == pytest.approx(naive.item(), abs=1e-4)


def test_sft_run_moves_weights_and_writes_record(tmp_path):
    cfg = SFTConfig(
        task="arith", steps=3, batch_size=8, out=str(tmp_path), run_id="sft-test", sample_every=2, eval_size=8
    )
    policy = load_policy("arith", mode="lora", device="cpu")
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    metrics = list(train(cfg, policy=policy))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss/sft"]) for m in metrics)
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(policy.trainable_parameters(), before))
    assert moved > 0
    run = tmp_path / "sft-test"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["step"] == 3
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and "eval" in status["summary"]
    assert (run / "checkpoints" / "final" / "adapter_config.json").exists()
    assert (run / "samples.jsonl").read_text().strip()


def test_sft_stop_after_current_step(tmp_path):
    """Closing the generator (what a UI's Stop does) finishes the record as stopped with the steps done so far."""
    cfg = SFTConfig(task="arith", steps=50, batch_size=4, out=str(tmp_path), run_id="stop-test", eval_size=4)
    gen = train(cfg)
    next(gen), next(gen)
    gen.close()
    status = json.loads((tmp_path / "stop-test" / "status.json").read_text())
    assert status["status"] == "stopped" and status["summary"]["steps"] == 2
    assert len((tmp_path / "stop-test" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("lr", 5.0, "lr: must be in"),
        ("batch_size", 0, "batch_size"),
        ("mode", "int8", "mode: must be one of"),
        ("task", "bandit", "task: bandit has no demonstrations"),
    ],
)
def test_bad_hyperparameters_name_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        SFTConfig(**{field: value})


def test_shuffled_batches_cover_every_row_once_per_epoch():
    """10 rows in batches of 4: the first 10 indices drawn are a permutation of all rows (one epoch), batches are
    always full, and the same seed gives the same order."""
    from itertools import islice

    from lab.runner import shuffled_batches

    rows = list(range(10))
    drawn = [i for batch in islice(shuffled_batches(rows, 4, seed=3), 5) for i in batch]
    assert sorted(drawn[:10]) == rows and sorted(drawn[10:20]) == rows
    assert all(len(b) == 4 for b in islice(shuffled_batches(rows, 4, seed=3), 5))
    assert drawn == [i for b in islice(shuffled_batches(rows, 4, seed=3), 5) for i in b]
    assert drawn != [i for b in islice(shuffled_batches(rows, 4, seed=4), 5) for i in b]


def test_sft_logs_kl_ref_every_kl_every_steps(tmp_path):
    """SFT logs kl/ref = KL(π_θ‖π_ref) per completion, from one fresh sample of π_θ on each of kl_prompts
    held-out prompts, before the step's update: 0 at step 1 with a fresh adapter (B = 0: π_θ = π_ref), nonzero
    after. kl_every = 2 over 3 steps logs it at steps 1 and 3; kl_every = 0 never touches π_ref."""
    cfg = SFTConfig(
        task="arith",
        steps=3,
        batch_size=8,
        lr=3e-2,
        kl_every=2,
        kl_prompts=4,
        sample_every=0,
        out=str(tmp_path),
        run_id="k",
    )
    metrics = list(train(cfg, policy=load_policy("arith", mode="lora", device="cpu")))
    assert ["kl/ref" in m for m in metrics] == [True, False, True]
    assert metrics[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert abs(metrics[2]["kl/ref"]) > 1e-6

    policy = load_policy("arith", mode="lora", device="cpu")

    def no_reference():
        raise AssertionError("kl_every = 0 must not compute the reference")

    policy.reference = no_reference
    cfg = SFTConfig(task="arith", steps=2, batch_size=8, kl_every=0, sample_every=0, out=str(tmp_path), run_id="n")
    assert not any("kl/ref" in m for m in train(cfg, policy=policy))


def test_shuffled_batches_refuse_an_empty_dataset():
    """No rows would otherwise loop forever looking for a full batch."""
    import pytest

    from lab.runner import shuffled_batches

    with pytest.raises(ValueError, match="no rows"):
        next(shuffled_batches([], 4, seed=0))
