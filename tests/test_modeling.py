"""The model layer: full / LoRA / QLoRA loading, the reference from disabled adapters, scalar heads, errors."""

import json

import pytest
import torch

from lab.modeling import (
    ModelNotFound,
    ScalarModel,
    add_value_head,
    load_causal_lm,
    load_policy,
    load_scalar_model,
    pick_dtype,
)

IDS = torch.tensor([[3, 4, 5, 6, 1], [7, 8, 9, 10, 11]])
MASK = torch.ones_like(IDS)


def _logprobs(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float().log_softmax(-1)


def _train_one_step(policy):
    """One SGD step on the policy's trainable weights, so it no longer equals the base."""
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    loss = -policy.model(input_ids=IDS, attention_mask=MASK).logits.float().log_softmax(-1)[..., 3].mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_reference_is_base_with_adapters_off(tiny_model_dir, mode):
    """After training moves the adapter, the reference still equals a freshly loaded base model exactly,
    and the policy itself differs from it."""
    policy = load_policy(tiny_model_dir, mode=mode, device="cpu")
    base = load_causal_lm(tiny_model_dir, quantize_4bit=mode == "qlora", device="cpu")
    _train_one_step(policy)
    with policy.reference() as ref:
        ref_lp = _logprobs(ref)
    base_lp = _logprobs(base)
    assert torch.allclose(ref_lp, base_lp, atol=1e-5)
    assert (_logprobs(policy.model) - base_lp).abs().max() > 1e-3
    # one set of base weights: the adapter modes keep no second model around
    assert policy._ref_model is None


def test_qlora_base_is_4bit_and_only_adapters_train(tiny_model_dir):
    import bitsandbytes as bnb

    policy = load_policy(tiny_model_dir, mode="qlora", device="cpu")
    four_bit = [m for m in policy.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(four_bit[0].weight.quant_state.quant_type == "nf4" for _ in [0])
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_full_mode_reference_is_frozen_copy(tiny_model_dir):
    policy = load_policy(tiny_model_dir, mode="full", device="cpu")
    before = _logprobs(policy.model)
    _train_one_step(policy)
    with policy.reference() as ref:
        assert torch.allclose(_logprobs(ref), before)
        assert not any(p.requires_grad for p in ref.parameters())
    assert (_logprobs(policy.model) - before).abs().max() > 1e-3


def test_saved_adapter_loads_anywhere_and_reproduces_policy(tiny_model_dir, tmp_path):
    policy = load_policy(tiny_model_dir, mode="lora", device="cpu")
    _train_one_step(policy)
    policy.save(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_model_dir
    again = load_policy(str(tmp_path / "ckpt"), mode="lora", device="cpu")
    assert torch.allclose(_logprobs(again.model), _logprobs(policy.model), atol=1e-5)


def test_value_head_shares_base_and_trains_only_its_adapter(tiny_model_dir):
    policy = load_policy(tiny_model_dir, mode="lora", device="cpu")
    value = add_value_head(policy)
    assert policy.model.active_adapter == "default"
    v = value(IDS, MASK)
    assert v.shape == (2, 5) and torch.all(v == 0)  # zero-initialised head: V = 0 before training
    names = {id(p) for p in value.trainable_parameters()}
    lora_value = [n for n, p in policy.model.named_parameters() if ".value." in n]
    assert lora_value and len(names) == len(lora_value) + 2  # its adapter + head weight and bias
    policy_lp = _logprobs(policy.model)
    opt = torch.optim.SGD(value.trainable_parameters(), lr=0.5)
    for _ in range(3):
        value(IDS, MASK).sub(1.0).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert value(IDS, MASK).mean() > 0.1  # the value function learns
    assert torch.allclose(_logprobs(policy.model), policy_lp)  # and the policy did not move


def test_scalar_score_reads_last_real_token(tiny_model_dir):
    rm, _ = load_scalar_model(tiny_model_dir, mode="lora", device="cpu")
    right = torch.tensor([[3, 4, 5, 0, 0]])
    left = torch.tensor([[0, 0, 3, 4, 5]])
    s_right = rm.score(right, torch.tensor([[1, 1, 1, 0, 0]]))
    s_left = rm.score(left, torch.tensor([[0, 0, 1, 1, 1]]))
    s_plain = rm.score(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
    assert torch.allclose(s_right, s_plain, atol=1e-5) and torch.allclose(s_left, s_plain, atol=1e-5)


def test_reward_model_round_trip(tiny_model_dir, tmp_path):
    rm, _ = load_scalar_model(tiny_model_dir, mode="lora", device="cpu")
    torch.nn.init.normal_(rm.head.weight)
    rm.save(tmp_path / "rm")
    again, tok = load_scalar_model(str(tmp_path / "rm"), device="cpu")
    assert isinstance(again, ScalarModel)
    assert torch.allclose(again.score(IDS, MASK), rm.score(IDS, MASK), atol=1e-5)


def test_offline_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as err:
        load_policy("some-org/some-model-that-is-not-here", mode="lora")
    message = str(err.value)
    assert "\n" not in message and "Built-in models:" in message and "arith" in message


def test_missing_local_folder_is_named():
    with pytest.raises(ModelNotFound, match="no model folder at './nowhere'"):
        load_policy("./nowhere", mode="lora")


def test_cpu_precision_is_fp32():
    assert pick_dtype(torch.device("cpu")) == torch.float32
