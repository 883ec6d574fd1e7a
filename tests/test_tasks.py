"""Built-in tasks: registry, splits, gold rewards, preference data, and the shipped base policies."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lab.sampling import generate
from lab.tasks import TASKS, UnknownTaskError, get_task
from lab.tasks.arith import CARRY_DROP_RATE, ArithTask, dropped_carry_answer, has_carry, parse_prompt
from lab.tasks.base import builtin_model_dir
from lab.tasks.reviews import ReviewsTask, bayes_accuracy, gold_reward, reward_terms

NAMES = ["arith", "reviews", "bandit"]


@pytest.fixture(scope="module")
def arith_model():
    path = builtin_model_dir("arith")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# --- registry and splits -------------------------------------------------------------------------------
def test_registry_lists_builtins():
    assert sorted(TASKS) == sorted(NAMES)
    for name in NAMES:
        task = get_task(name)
        assert task.name == name and task.model == name
        assert task.kind in {"verifiable", "graded", "bandit"}
    with pytest.raises(UnknownTaskError, match="arith, bandit, reviews"):
        get_task("chess")


@pytest.mark.parametrize("cls", [ArithTask, ReviewsTask])
def test_splits_deterministic_and_disjoint(cls):
    a, b = cls(), cls()
    assert a.train_prompts() == b.train_prompts() and a.eval_prompts() == b.eval_prompts()
    train, held = set(a.train_prompts()), set(a.eval_prompts())
    assert train and held and not train & held
    assert len(train) == len(a.train_prompts())  # no duplicates
    assert a.prompts("test") == a.eval_prompts()
    with pytest.raises(ValueError, match="unknown split"):
        a.prompts("validation")


def test_bandit_evaluates_on_its_training_prompts():
    task = get_task("bandit")
    assert task.train_prompts() == task.eval_prompts() and len(task.train_prompts()) == 6


def test_arith_split_sizes_and_pretraining_never_sees_heldout():
    task = get_task("arith")
    assert len(task.eval_prompts()) == 200 and len(task.train_prompts()) == 90 * 90 - 200
    seen = {row["prompt"] for row in task.sample_pretrain_rows(20_000, random.Random(0))}
    assert not seen & set(task.eval_prompts())


# --- arith -------------------------------------------------------------------------------------------
def test_arith_gold_reward_hand_cases():
    task = get_task("arith")
    assert task.gold_reward("47+38=", "85") == 1.0
    assert task.gold_reward("47+38=", "75") == 0.0  # dropped carry
    assert task.gold_reward("47+38=", "850") == 0.0
    assert task.gold_reward("47+38=", "") == 0.0
    assert task.gold_reward("47+38=", " 85") == 1.0  # spacing is not the answer
    assert task.gold_reward("99+99=", "198") == 1.0
    assert task.gold_rewards(["10+10=", "12+34="], ["20", "47"], [False, True]) == [1.0, 0.0]


def test_arith_common_mistake():
    """47+38: ones 7+8 = 15 -> 5, tens 4+3 = 7 without the carry -> 75. 95+17 -> 102. 12+34 has no carry."""
    assert dropped_carry_answer(47, 38) == 75 and dropped_carry_answer(95, 17) == 102
    assert has_carry(47, 38) and not has_carry(12, 34)
    rows = get_task("arith").sft_rows("train")
    carry = [r for r in rows if has_carry(*parse_prompt(r["prompt"]))]
    no_carry = [r for r in rows if not has_carry(*parse_prompt(r["prompt"]))]
    wrong = sum(int(r["completion"]) != sum(parse_prompt(r["prompt"])) for r in carry) / len(carry)
    assert wrong == pytest.approx(CARRY_DROP_RATE, abs=0.03)
    assert all(int(r["completion"]) == sum(parse_prompt(r["prompt"])) for r in no_carry)
    assert rows == get_task("arith").sft_rows("train")


# --- reviews -----------------------------------------------------------------------------------------
def test_reviews_gold_reward_hand_cases():
    """great +2, good +1, fine/okay 0; repeats −3 each, words past 12 −2.5 each, missing end −3."""
    clean = "the pasta was great ."
    assert gold_reward(clean) == 2.0
    # repetition: +2 for the second "great", −3 for repeating it -> 1.0
    assert gold_reward("the pasta was great great .") == 1.0
    # length: 20 words, sentiment 2+0+0+1 = 3, 8 words over the limit -> 3 − 20 = −17
    long = "the pasta was great , the soup was fine , the bread was okay , the cake was good ."
    assert len(long.split()) == 20 and gold_reward(long) == -17.0
    assert gold_reward("the pasta was great , the cake was good .") == 3.0  # same praise, 10 words
    # missing end: no final "." or truncated (no eos) -> −3
    assert gold_reward("the pasta was great") == -1.0
    assert gold_reward(clean, truncated=True) == -1.0
    assert gold_reward("") == -3.0
    # function words ("the", "was", ",") repeat without penalty
    assert reward_terms("the pasta was good , the soup was nice .")["repetition"] == 0.0
    task = get_task("reviews")
    prompt = "review of the pasta :"
    assert task.gold_rewards([prompt, prompt], [clean, clean], truncated=[False, True]) == [2.0, -1.0]
    with pytest.raises(ValueError, match="not a reviews prompt"):
        task.gold_reward("47+38=", clean)


def test_reviews_preference_rows_well_formed_and_bradley_terry():
    task = get_task("reviews")
    rows = {split: task.preference_rows(split) for split in ("train", "eval")}
    assert len(rows["train"]) == 2000 and len(rows["eval"]) == 500
    for split, split_rows in rows.items():
        prompts = set(task.prompts(split))
        for row in split_rows:
            assert row["prompt"] in prompts
            assert row["chosen"] != row["rejected"]
            assert row["chosen_gold"] == gold_reward(row["chosen"], row["chosen_truncated"])
            assert row["rejected_gold"] == gold_reward(row["rejected"], row["rejected_truncated"])
    # the gold reward agrees with the noisy labels more often than chance, but not always ...
    accuracy = bayes_accuracy(rows["eval"])
    assert 0.7 < accuracy < 0.97
    # ... and as often as Bradley–Terry with τ = 1 predicts: mean σ(|Δr|) ± 3 std (ties count 1/2)
    train = rows["train"]
    p_agree = [1 / (1 + math.exp(-abs(r["chosen_gold"] - r["rejected_gold"]))) for r in train]
    std = math.sqrt(sum(p * (1 - p) for p in p_agree))
    assert abs(bayes_accuracy(train) * len(train) - sum(p_agree)) < 3 * std


def test_reviews_base_samples_vary_in_gold_reward():
    """The shipped pairs come from the base policy: good and bad reviews, truncated ones included."""
    rows = get_task("reviews").preference_rows("train")
    golds = [r["chosen_gold"] for r in rows] + [r["rejected_gold"] for r in rows]
    assert max(golds) >= 4 and min(golds) <= -10
    assert any(r["rejected_truncated"] for r in rows)


# --- shipped models and tokenizers -------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_loads_like_a_hub_model(name):
    path = builtin_model_dir(name)
    assert (path / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size % 64 == 0
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    task = get_task(name)
    row = task.sft_rows("eval")[0]
    ids = tokenizer(row["prompt"] + row["completion"], return_tensors="pt")["input_ids"]
    assert tokenizer.unk_token_id not in ids[0].tolist()
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_round_trip(name):
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir(name))
    for row in get_task(name).sft_rows("train")[:200]:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        completion_ids = tokenizer(row["completion"])["input_ids"]
        # decode(ids + eos, skip_special_tokens) gives back the exact text
        assert (
            tokenizer.decode(completion_ids + [tokenizer.eos_token_id], skip_special_tokens=True) == row["completion"]
        )
        assert tokenizer.decode(prompt_ids) == row["prompt"]
        # the concatenated text tokenizes as the two parts (prompts end in punctuation or "=")
        assert tokenizer(row["prompt"] + row["completion"])["input_ids"] == prompt_ids + completion_ids


def test_arith_base_policy_greedy_accuracy_and_sampling_headroom(arith_model):
    """Greedy held-out accuracy in [0.30, 0.70]; where greedy fails, the right answer keeps real mass."""
    model, tokenizer = arith_model
    task = get_task("arith")
    prompts = task.eval_prompts()
    roll = generate(model, tokenizer, prompts, task.max_new_tokens, greedy=True)
    completions, truncated = roll.completions, roll.truncated.tolist()
    rewards = task.gold_rewards(prompts, completions, truncated)
    accuracy = sum(rewards) / len(rewards)
    assert 0.30 <= accuracy <= 0.70

    # exact P(correct answer + eos | prompt) on the failures, by teacher forcing in one batch
    failed = [p for p, r in zip(prompts, rewards) if r == 0.0]
    targets = [tokenizer(str(sum(parse_prompt(p))))["input_ids"] + [tokenizer.eos_token_id] for p in failed]
    prompt_ids = tokenizer(failed)["input_ids"]  # every prompt is "ab+cd=": 6 tokens, no padding needed
    P, T = len(prompt_ids[0]), max(len(t) for t in targets)
    ids = torch.full((len(failed), P + T), tokenizer.pad_token_id)  # (B, P+T), right-padded
    target_mask = torch.zeros(len(failed), T)  # (B, T)
    for i, (prompt, target) in enumerate(zip(prompt_ids, targets)):
        ids[i, : P + len(target)] = torch.tensor(prompt + target)
        target_mask[i, : len(target)] = 1
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[:, P - 1 : -1].log_softmax(-1)  # (B, T, V), causal: pads come after
    token_logprobs = logprobs.gather(-1, ids[:, P:, None]).squeeze(-1)  # (B, T)
    p_correct = (token_logprobs * target_mask).sum(-1).exp()  # (B,)
    assert p_correct.mean() > 0.2
