"""lab.rm: the Bradley–Terry loss, held-out metrics against the gold reward, encoding, runs and loading."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lab.batching import encode_completions
from lab.config import ConfigError
from lab.rm import (
    RewardConfig,
    bayes_accuracy,
    evaluate_reward_model,
    load_reward_model,
    reward_loss,
    train,
)

t = torch.tensor


# ---- the loss --------------------------------------------------------------------------------------------------


def test_reward_loss_hand_computed():
    """r_w = (2, 0), r_l = (1, 1): margins (1, −1), losses log(1+e^−1) = 0.313262 and log(1+e) = 1.313262,
    mean 0.813262; accuracy 1/2, mean margin 0, rewards/chosen 1, rewards/rejected 1.
    Centering η = 0.1: (r_w + r_l)² = (9, 1), mean 5, adds 0.5 → 1.313262."""
    loss, m = reward_loss(t([2.0, 0.0]), t([1.0, 1.0]))
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert m["loss/rm"].item() == pytest.approx(0.813262, abs=1e-6)
    assert m["rm/accuracy"].item() == 0.5
    assert m["rm/margin"].item() == pytest.approx(0.0)
    assert m["rewards/chosen"].item() == pytest.approx(1.0) and m["rewards/rejected"].item() == pytest.approx(1.0)
    centered, m = reward_loss(t([2.0, 0.0]), t([1.0, 1.0]), center_weight=0.1)
    assert centered.item() == pytest.approx(1.313262, abs=1e-6)
    assert m["loss/rm"].item() == pytest.approx(1.313262, abs=1e-6)


def test_reward_loss_gradient_and_shift_invariance():
    """d L/d r_w = −σ(−(r_w − r_l))/B; adding a constant to every score leaves L unchanged (η = 0) but not
    the centered loss."""
    chosen = t([0.3, -1.0, 2.0]).requires_grad_()
    rejected = t([0.0, 0.5, -1.0])
    loss, _ = reward_loss(chosen, rejected)
    loss.backward()
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-(chosen.detach() - rejected)) / 3)
    shifted, _ = reward_loss(chosen.detach() + 5, rejected + 5)
    assert shifted.item() == pytest.approx(loss.item(), abs=1e-6)
    a, _ = reward_loss(chosen.detach(), rejected, center_weight=0.1)
    b, _ = reward_loss(chosen.detach() + 5, rejected + 5, center_weight=0.1)
    assert b.item() > a.item() + 1


def test_bayes_accuracy_hand_computed():
    """Gold agrees with the label, disagrees, ties: (1 + 0 + 0.5) / 3 = 0.5."""
    rows = [
        {"chosen_gold": 2.0, "rejected_gold": 1.0},
        {"chosen_gold": 0.0, "rejected_gold": 1.0},
        {"chosen_gold": 1.0, "rejected_gold": 1.0},
    ]
    assert bayes_accuracy(rows) == 0.5


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match=r"^center_weight: must be in \[0.0, 10.0\], got -1"):
        RewardConfig(center_weight=-1)
    with pytest.raises(ConfigError, match="^task:"):
        RewardConfig(task="arith")


# ---- encoding ----------------------------------------------------------------------------------------------------


def test_encode_completions_equals_encoding_each_row_alone(tiny_model_dir):
    """Naive equivalent: each row encoded alone with eos iff it ended, then right-padded together."""
    from transformers import AutoTokenizer

    from lab.batching import encode_pairs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["w1 w2", "w3", "w4 w5 w6"]
    completions = ["w7 w8 w9", "w10", "w11 w12"]
    ended = [True, False, True]
    batch = encode_completions(tok, prompts, completions, ended)
    for i in range(3):
        alone = encode_pairs(tok, [prompts[i]], [completions[i]], add_eos=ended[i])
        n = alone.input_ids.shape[1]
        assert batch.attention_mask[i].sum() == n
        assert batch.input_ids[i, :n].tolist() == alone.input_ids[0].tolist()
        assert batch.completion_mask[i, :n].tolist() == alone.completion_mask[0].tolist()
        assert batch.completion_mask[i, n:].sum() == 0
    assert batch.input_ids[1, :3].tolist()[-1] != tok.eos_token_id  # the truncated row has no eos


# ---- held-out metrics ----------------------------------------------------------------------------------------------


class GoldLookup(nn.Module):
    """A 'reward model' that returns the gold reward of the text it is given (looked up by token ids)."""

    def __init__(self, tokenizer, rows):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.table = {}
        for r in rows:
            for side in ("chosen", "rejected"):
                ended = not r.get(f"{side}_truncated", False)
                b = encode_completions(tokenizer, [r["prompt"]], [r[side]], [ended])
                self.table[tuple(b.input_ids[0].tolist())] = r[f"{side}_gold"]

    def score(self, input_ids, attention_mask):
        keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        return torch.tensor([self.table[k] for k in keys]) + 0 * self.weight


def test_the_gold_reward_scores_exactly_the_bayes_accuracy_and_spearman_one():
    """Identity: a reward model equal to the gold reward has eval/accuracy = eval/bayes_accuracy (ties aside)
    and eval/spearman = 1; its negation has Spearman −1."""
    from lab.modeling import load_tokenizer
    from lab.tasks import get_task

    tok = load_tokenizer("reviews")
    rows = [r for r in get_task("reviews").preference_rows("eval")[:200] if r["chosen_gold"] != r["rejected_gold"]]
    gold_model = GoldLookup(tok, rows)
    out = evaluate_reward_model(gold_model, tok, rows, batch_size=64)
    assert out["eval/accuracy"] == pytest.approx(out["eval/bayes_accuracy"])
    assert 0.6 < out["eval/bayes_accuracy"] < 1.0  # noisy labels: the gold reward itself misses some
    assert out["eval/spearman"] == pytest.approx(1.0)
    assert out["eval/margin"] == pytest.approx(sum(r["chosen_gold"] - r["rejected_gold"] for r in rows) / len(rows))
    negated = SimpleNamespace(
        score=lambda i, m: -gold_model.score(i, m),
        parameters=gold_model.parameters,
        training=False,
        eval=lambda: None,
        train=lambda mode=True: None,
    )
    flipped = evaluate_reward_model(negated, tok, rows, batch_size=64)
    assert flipped["eval/spearman"] == pytest.approx(-1.0)
    assert flipped["eval/accuracy"] == pytest.approx(1 - out["eval/accuracy"])


# ---- runs and loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_few_steps_train_and_the_checkpoint_scores_the_same(tmp_path, mode):
    cfg = RewardConfig(
        task="reviews",
        mode=mode,
        steps=2,
        batch_size=8,
        eval_pairs=16,
        lr=1e-2,
        lora_r=4,
        lora_alpha=8,
        out=str(tmp_path),
        run_id="rm",
    )
    from lab.rm import load_reward_backbone
    from lab.tasks import get_task

    model = load_reward_backbone(cfg, get_task("reviews"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = list(train(cfg, policy=model))
    assert [r["step"] for r in rows] == [1, 2]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    metrics = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    status = json.loads((tmp_path / "rm" / "status.json").read_text())
    assert status["status"] == "completed" and len(metrics) == 2
    for key in (
        "loss/rm",
        "rm/accuracy",
        "rm/margin",
        "rewards/chosen",
        "rewards/rejected",
        "eval/accuracy",
        "eval/spearman",
        "eval/spearman_pooled",
        "eval/bayes_accuracy",
    ):
        assert key in metrics[-1], key
    # the run folder loads back as a scorer that gives the trained model's scores
    scorer = load_reward_model(str(tmp_path / "rm"))
    prompts, completions = ["review of the pasta :"] * 2, ["the pasta was great .", "the pasta was awful"]
    batch = encode_completions(model.tokenizer, prompts, completions, [True, False])
    model.eval()
    with torch.no_grad():
        expected = model.score(batch.input_ids, batch.attention_mask)
    scores = scorer(prompts, completions, truncated=[False, True])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected.float().cpu(), atol=1e-5, rtol=1e-5)


def test_a_sequence_classification_model_is_a_reward_model_too(tmp_path, tiny_model_dir):
    """Any AutoModelForSequenceClassification trains and loads through the same interface."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    seqcls = tmp_path / "seqcls"
    LlamaForSequenceClassification(config).save_pretrained(seqcls)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(seqcls)
    data = tmp_path / "prefs.jsonl"
    with open(data, "w") as f:
        for i in range(20):
            f.write(
                json.dumps({"prompt": f"w{i % 5}", "chosen": f"w{10 + i % 7} w3", "rejected": f"w{30 + i % 9}"}) + "\n"
            )
    cfg = RewardConfig(
        task=f"jsonl:{data}",
        reward_model=str(seqcls),
        mode="full",
        steps=2,
        batch_size=4,
        lr=1e-2,
        out=str(tmp_path),
        run_id="sc",
    )
    rows = list(train(cfg))
    assert "eval/accuracy" in rows[-1] and "eval/spearman" not in rows[-1]  # no gold reward in the file
    scorer = load_reward_model(str(tmp_path / "sc"))
    assert scorer(["w1", "w2"], ["w10 w3", "w31"]).shape == (2,)


def test_cli_bad_hyperparameter_is_one_line(tmp_path, capsys):
    from lab.cli import main

    assert main(["train", "rm", "--center-weight", "-1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: center_weight: must be in [0.0, 10.0], got -1.0"


def test_within_prompt_spearman_hand_computed():
    """Prompt a: gold (1, 2, 3), learned (1, 3, 2): rank differences (0, 1, −1), ρ = 1 − 6·2/(3·8) = 0.5.
    Prompt b: gold (1, 2, 3, 4), learned reversed: ρ = −1. Prompt c has 2 completions and prompt d a constant gold
    reward: both skipped. Mean (0.5 − 1)/2 = −0.25. Adding prompt e, whose learned reward is constant, counts it
    as 0: (0.5 − 1 + 0)/3 = −1/6. With no prompt left, None."""
    from lab.rm import within_prompt_spearman

    prompts = ["a"] * 3 + ["b"] * 4 + ["c"] * 2 + ["d"] * 3
    gold = [1, 2, 3] + [1, 2, 3, 4] + [1, 2] + [5, 5, 5]
    learned = [1, 3, 2] + [4, 3, 2, 1] + [1, 2] + [1, 2, 3]
    assert within_prompt_spearman(prompts, learned, gold) == pytest.approx(-0.25)
    assert within_prompt_spearman(prompts + ["e"] * 3, learned + [0, 0, 0], gold + [1, 2, 3]) == pytest.approx(-1 / 6)
    assert within_prompt_spearman(["c", "c"], [1, 2], [1, 2]) is None


def test_per_prompt_offsets_leave_within_prompt_spearman_at_one_and_pull_the_pooled_one_down():
    """Bradley–Terry identifies r only up to a constant per prompt. A reward model equal to the gold reward plus a
    per-prompt offset (opposite to the prompt's mean gold reward, ×10) ranks every prompt's completions exactly:
    eval/spearman = 1, pair accuracy unchanged; but pooled over prompts the offsets dominate:
    eval/spearman_pooled is low (measured 0.37 on these 184 reviews pairs)."""
    from lab.modeling import load_tokenizer
    from lab.tasks import get_task

    tok = load_tokenizer("reviews")
    rows = [r for r in get_task("reviews").preference_rows("eval")[:200] if r["chosen_gold"] != r["rejected_gold"]]
    means: dict[str, list[float]] = {}
    for r in rows:
        means.setdefault(r["prompt"], []).extend([r["chosen_gold"], r["rejected_gold"]])
    offset = {p: -10 * sum(v) / len(v) for p, v in means.items()}
    shifted = [
        {
            **r,
            "chosen_gold": r["chosen_gold"] + offset[r["prompt"]],
            "rejected_gold": r["rejected_gold"] + offset[r["prompt"]],
        }
        for r in rows
    ]
    exact = evaluate_reward_model(GoldLookup(tok, rows), tok, rows, batch_size=64)
    out = evaluate_reward_model(GoldLookup(tok, shifted), tok, rows, batch_size=64)
    assert len(means) >= 5
    assert out["eval/spearman"] == pytest.approx(1.0)
    assert out["eval/accuracy"] == pytest.approx(exact["eval/accuracy"])
    assert exact["eval/spearman_pooled"] == pytest.approx(1.0)
    assert out["eval/spearman_pooled"] < 0.7, out["eval/spearman_pooled"]
