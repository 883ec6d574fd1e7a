"""Loading policies: full fine-tuning, LoRA and QLoRA, with the reference policy for free.

A :class:`Policy` is a causal LM plus its tokenizer. In ``lora`` and ``qlora`` mode only the adapter is trained, so
the reference policy π_ref is the *same* weights with the adapter switched off (``policy.reference()``): no second
copy of the model is ever loaded. In ``full`` mode every weight moves, so a frozen copy is kept as the reference.

Scalar models (value functions, reward models) are the same backbone with their own adapter and a linear head
(:class:`ScalarModel`). A value head on the policy's base therefore costs one more adapter, not one more model.

Defaults are the safe ones: weights load from safetensors only, ``trust_remote_code`` is off unless asked for,
and precision follows the hardware (bf16 only on a GPU that supports it natively, fp32 on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lab import dist
from lab.errors import ConfigError, UserError
from lab.ops import position_ids_from_mask

MODELS_DIR = Path(__file__).parent / "models"

# bitsandbytes (imported by peft, so by every adapter run) tries, on CPUs with AVX512-BF16, to fetch a fused kernel
# for its inference-only packed 4-bit layout from the hub, and logs a warning when it cannot. The lab never uses
# that layout (see _keep_4bit_differentiable) and its fallback is a bundled kernel, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)
# peft (≤ 0.18) reads transformers' renamed `is_gradient_checkpointing` when it wraps a model: a FutureWarning on
# every adapter load that is about peft's code, not the user's.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


class ModelNotFound(UserError, OSError):
    """The model could not be found locally and the hub could not provide it. The message is one line."""


class BadModelFiles(UserError, ValueError):
    """A model folder exists but cannot be used: corrupt weights, a tokenizer without pad and eos tokens."""


def builtin_models() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").exists()) if MODELS_DIR.exists() else []


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → the GPU when there is one, else the CPU; ``cuda`` on a machine without one is refused in one
    line (torch's own message, "Torch not compiled with CUDA enabled", comes from deep inside the first load)."""
    from lab import dist

    if device in ("auto", "cuda") and torch.cuda.is_available() and dist.world_size() > 1:
        return dist.device()  # several processes (torchrun): one GPU each, cuda:LOCAL_RANK
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device: {device} was asked for, but torch sees no CUDA GPU on this machine; use auto or cpu"
        )
    return torch.device(device)


def pick_dtype(device: torch.device, frozen_base: bool = False) -> torch.dtype:
    """The compute dtype of the base weights.

    bf16 wherever the GPU has it natively (Ampere and newer): the range of fp32, so no loss scaling. On older GPUs
    (a Colab T4) bf16 is emulated and slow, and fp16 would underflow the activation gradients that flow back through
    the base to the adapters unless every trainer scaled its loss, so the base computes in fp32 there (a 4-bit
    base is still stored in 4 bits; only its matmuls run in fp32). The CPU computes in fp32. ``frozen_base`` (only
    adapters train) does not change the choice today; it is the hook for a loss-scaled fp16 path."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def resolve_model_path(name: str) -> str:
    """A built-in name → its folder inside the package; an existing local folder → itself; anything else is
    returned unchanged and treated as a hub id by ``from_pretrained``."""
    if (MODELS_DIR / name / "config.json").exists():
        return str(MODELS_DIR / name)
    return name


def _offline_message(name: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"could not load model {name!r}: it is not a built-in model or a local folder, and the hub did not "
        f"provide it ({first[:160]}). Built-in models: {', '.join(builtin_models())}"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint, so an offline machine fails in seconds instead of retrying."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_source(name: str, path: str) -> None:
    """Fail fast, in one line, when ``name`` is neither a local folder nor reachable on the hub."""
    if os.path.isdir(path):
        return
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ModelNotFound(f"no model folder at {name!r}. Built-in models: {', '.join(builtin_models())}")
    if not _in_hub_cache(name) and not hub_reachable():
        raise ModelNotFound(
            f"cannot load {name!r}: it is not a built-in model or a local folder, and the hub "
            f"cannot be reached from here (offline). Built-in models: {', '.join(builtin_models())}"
        )


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def _is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json"))


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    _check_source(name, path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelNotFound(_offline_message(name, err)) from None
    if tok.pad_token is None and tok.eos_token is None:
        # sampling stops at eos and batches pad with pad: without either, no completion could end or be batched
        raise BadModelFiles(
            f"the tokenizer of {name!r} has neither a pad token nor an eos token; set eos_token "
            "(and pad_token) in its tokenizer_config.json"
        )
    if tok.pad_token is None:
        # Many hub LMs ship without a pad token. Masks, not the pad id, decide what counts, so eos is a safe pad.
        tok.pad_token = tok.eos_token
    return tok


def check_safetensors(path: str) -> None:
    """Open the header of every ``*.safetensors`` file in a local folder, so a truncated or garbage file fails in
    one line naming it, before ``from_pretrained`` (which raises a bare ``SafetensorError`` without the file name).
    safetensors checks at open that the header parses and that its tensors cover the file exactly; nothing else is
    read (the file is memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(path):
        return
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadModelFiles(
                f"{file} is not a readable safetensors file ({reason}); it is truncated or corrupt: "
                "download or save the model again"
            ) from None


def load_causal_lm(
    name: str,
    *,
    quantize_4bit: bool = False,
    device: str = "auto",
    trust_remote_code: bool = False,
    frozen_base: bool = False,
):
    """``AutoModelForCausalLM.from_pretrained`` with the lab's defaults (safetensors only, dtype by hardware;
    ``frozen_base``: only adapters will train, see :func:`pick_dtype`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load bar for tiny models is noise in the CLI and the notebooks

    dev = pick_device(device)
    dtype = pick_dtype(dev, frozen_base=frozen_base or quantize_4bit)
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        # QLoRA (Dettmers et al. 2023): nf4 storage, double quantization, compute in the training dtype.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    path = resolve_model_path(name)
    _check_source(name, path)
    check_safetensors(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if "safetensors" in str(err).lower() and os.path.isdir(path):
            raise ModelNotFound(
                f"model {name!r} has no safetensors weights; the lab loads safetensors only "
                f"(convert the checkpoint with save_pretrained(safe_serialization=True))"
            ) from None
        raise ModelNotFound(_offline_message(name, err)) from None
    if quantize_4bit:
        _keep_4bit_differentiable(model)
    else:
        model.to(dev)
    disable_dropout(model)
    return model


def disable_dropout(model) -> None:
    """Set every dropout of the loaded model to 0, as TRL's trainers do. GPT-2 ships with dropout 0.1: left on,
    the training forward would differ from the sampling one, so PPO's and GRPO's ratio π_θ/π_old would not be 1
    on the first update, and log-probs would be noisy. LoRA's own dropout (``--lora-dropout``) is added later and
    stays as configured."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Qwen2/Llama copy it at build time
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def _keep_4bit_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout, which has no backward.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` (bitsandbytes ≥ 0.48, nn/modules.py) repacks its weight for
    good the first time it runs in eval mode without grad. From then on ``matmul_4bit`` takes the fused bf16 gemv
    path, meant for inference: no gradient flows through it to the input, so adapters below get wrong gradients
    (silently, on Llama), and it adds the bias in place (``result += bias``), which raises "a view of a leaf
    Variable that requires grad is being used in an in-place operation" on layers with a bias (Qwen2's q/k/v,
    GPT-2's). The lab alternates no-grad rollouts with training forwards on the same weights, so it never packs.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class Policy:
    """A trainable causal LM, its tokenizer, and the way to get the reference policy from it."""

    def __init__(self, model, tokenizer, mode: str, name: str, ref_model=None):
        self.model = dist.shard_model(model, mode)  # under FSDP (lab.dist) sharded over the ranks; else as it is
        self.tokenizer = tokenizer
        self.mode = mode
        self.name = name
        self._ref_model = ref_model  # only in full mode

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapters(self) -> bool:
        return self.mode in ("lora", "qlora")

    @contextlib.contextmanager
    def reference(self):
        """Yield a model that computes π_ref. Adapter modes switch the adapter off; full mode uses a frozen copy."""
        if self.has_adapters:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self._ref_model

    @contextlib.contextmanager
    def adapter(self, name: str):
        """Temporarily make adapter ``name`` the active one (used by value heads sharing the policy's base)."""
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_parameters(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"total": total, "trainable": trainable}

    def save(self, path: str | os.PathLike) -> None:
        """Adapters only in adapter modes (small), full weights in full mode; the tokenizer always."""
        import warnings

        with warnings.catch_warnings():
            # peft looks for a config at the base name ("arith") to check the vocabulary; built-ins never change it
            warnings.filterwarnings("ignore", message="Could not find a config file")
            # the lab never resizes embeddings, so peft need not look the base config up (on the hub, for a name)
            self.model.save_pretrained(path, **_adapter_save_kwargs(self.model))
        self.tokenizer.save_pretrained(path)

    save_pretrained = save


def _adapter_save_kwargs(model) -> dict:
    return {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}


def _lora_config(r: int, alpha: int, dropout: float, model=None):
    from peft import LoraConfig

    # GPT-2's Conv1D stores its weight transposed (in × out); peft must know, or it warns and guesses
    conv1d = model is not None and any(type(m).__name__ == "Conv1D" for m in model.modules())
    # "all-linear" puts adapters on every projection but the output head, as QLoRA does.
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d,
    )


def load_policy(
    name: str | None = None,
    *,
    task: str | None = None,
    mode: str = "lora",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    device: str = "auto",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    prompts: list | None = None,
) -> Policy:
    """Load a policy by built-in name, local path or hub id (``name=None`` → the built-in model of ``task``).

    A folder holding a saved adapter (``adapter_config.json``) is loaded on top of its base model, and the adapter
    stays trainable, so a run can continue from another run's checkpoint. Given the run's ``prompts``, the tokenizer
    is checked against them before the model loads (chat messages need a chat template).
    """
    if name is None:
        from lab.tasks import get_task

        name = get_task(task or "arith").model
    if mode not in ("full", "lora", "qlora"):
        raise ValueError(f"mode must be full, lora or qlora, got {mode!r}")
    path = resolve_model_path(name)
    if _is_adapter_dir(path):
        policy = _load_adapter_policy(path, mode, device, trust_remote_code, prompts)
        if gradient_checkpointing:
            enable_gradient_checkpointing(policy.model)
        return policy
    tokenizer = load_tokenizer(name, trust_remote_code)
    check_prompts_fit_tokenizer(prompts, tokenizer, name)
    model = _load_base(name, mode, device, trust_remote_code)
    if mode == "full":
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return Policy(model, tokenizer, mode, name, ref_model=ref)
    model = _add_lora(model, name, mode, lora_r, lora_alpha, lora_dropout)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return Policy(model, tokenizer, mode, name)


def _load_base(name: str, mode: str, device: str, trust_remote_code: bool):
    """The causal LM under a policy or a scalar model: 4-bit for qlora, frozen unless every weight trains."""
    return load_causal_lm(
        name,
        quantize_4bit=mode == "qlora",
        device=device,
        trust_remote_code=trust_remote_code,
        frozen_base=mode != "full",
    )


def _add_lora(model, name: str, mode: str, lora_r: int, lora_alpha: int, lora_dropout: float, adapter: str = "default"):
    """A fresh LoRA adapter on ``model`` (the base called ``name``), which records its base for later loads."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if mode == "qlora":
        # Casts norms to fp32 and enables input grads so the adapters below a frozen 4-bit layer get gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, _lora_config(lora_r, lora_alpha, lora_dropout, model), adapter_name=adapter)
    model.peft_config[adapter].base_model_name_or_path = base_reference(name)
    return model


def _adapter_base(path: str, trust_remote_code: bool) -> tuple[str, object]:
    """A saved adapter folder's base model name (from adapter_config.json), and the tokenizer saved with the
    adapter, else its base model's."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        base_name = json.load(f)["base_model_name_or_path"]
    source = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else base_name
    return base_name, load_tokenizer(source, trust_remote_code)


def base_reference(name: str) -> str:
    """What a saved adapter records as its base: a built-in or hub name as given ("arith", "Qwen/Qwen2.5-0.5B"), so
    it loads on any machine, but a local folder as an absolute path, so "./my-model" still resolves when the
    adapter is loaded from another working directory."""
    if (MODELS_DIR / name / "config.json").exists() or not os.path.isdir(os.path.expanduser(name)):
        return name
    return os.path.abspath(os.path.expanduser(name))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them. The non-reentrant variant
    needs no input that requires grad, so it works under a frozen (or 4-bit) base with adapters on top."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(base).__name__} does not support it; turn it off")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_adapter_policy(
    path: str, mode: str, device: str, trust_remote_code: bool, prompts: list | None = None
) -> Policy:
    from peft import PeftModel

    mode = "qlora" if mode == "qlora" else "lora"
    check_safetensors(path)  # the adapter's own weights, before the base model loads
    base_name, tokenizer = _adapter_base(path, trust_remote_code)
    check_prompts_fit_tokenizer(prompts, tokenizer, path)
    model = _load_base(base_name, mode, device, trust_remote_code)
    model = PeftModel.from_pretrained(model, path, is_trainable=True)
    return Policy(model, tokenizer, mode, base_name)


def check_prompts_fit_tokenizer(prompts: list | None, tokenizer, name: str) -> None:
    """Conversational prompts (message lists) need the tokenizer's chat template: say so in one line."""
    if prompts and not getattr(tokenizer, "chat_template", None) and any(isinstance(p, list) for p in prompts):
        raise ConfigError(
            f"model: the data holds chat messages but the tokenizer of {name!r} has no chat template; "
            "use an instruct model with a template, or give plain-text prompts"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Scalar heads: value functions and reward models


def backbone_of(model) -> nn.Module:
    """The transformer trunk under the LM head (``LlamaForCausalLM.model``), through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


class ScalarModel(nn.Module):
    """A causal LM trunk + a linear head that maps each position's hidden state to a scalar.

    ``adapter`` names the LoRA adapter that is active while scoring. With ``policy`` given, the adapter is added to
    the policy's own peft model, so the value function shares the (possibly 4-bit) base weights.
    Scores are read at the last real token for a sequence score (reward) or at every position (value).
    """

    def __init__(self, lm, adapter: str | None, hidden_size: int, zero_init: bool = False):
        super().__init__()
        self.lm = lm
        self.adapter_name = adapter
        self.head = nn.Linear(hidden_size, 1)
        # A zero head makes V(s) = 0 at the start (no initial value bias); a reward head starts small and random.
        if zero_init:
            nn.init.zeros_(self.head.weight)
        else:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(lm.parameters()).device)

    @contextlib.contextmanager
    def _active(self):
        if self.adapter_name is None:
            yield
            return
        previous = self.lm.active_adapter
        self.lm.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            self.lm.set_adapter(previous)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-position scalars, (B, L) float32."""
        position_ids = position_ids_from_mask(attention_mask)  # (B, L) left padding: count real tokens only
        with self._active():
            hidden = backbone_of(self.lm)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state  # (B, L, H)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, L)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sequence score at the last real token, (B,). Works for left and right padding."""
        values = self.forward(input_ids, attention_mask)  # (B, L)
        L = attention_mask.shape[1]
        last = L - 1 - attention_mask.long().flip(-1).argmax(-1)  # index of the last 1 in each row
        return values.gather(1, last[:, None]).squeeze(1)  # (B,)

    def trainable_parameters(self) -> list[nn.Parameter]:
        with self._active():  # peft marks only the active adapter trainable
            params = [
                p
                for n, p in self.lm.named_parameters()
                if p.requires_grad and (self.adapter_name is None or f".{self.adapter_name}." in n)
            ]
        return params + list(self.head.parameters())

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        import warnings

        if self.adapter_name is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Could not find a config file")  # see Policy.save
                self.lm.save_pretrained(path, selected_adapters=[self.adapter_name], save_embedding_layers=False)
            sub = path / self.adapter_name  # peft puts a non-default adapter in a subfolder: lift it up
            if sub.is_dir():
                for item in sub.iterdir():
                    os.replace(item, path / item.name)
                sub.rmdir()
        else:
            self.lm.save_pretrained(path)
        torch.save(self.head.state_dict(), path / "scalar_head.pt")
        if getattr(self, "tokenizer", None) is not None:
            self.tokenizer.save_pretrained(path)

    save_pretrained = save


def add_value_head(policy: Policy, lora_r: int | None = None, lora_alpha: int | None = None) -> ScalarModel:
    """A value function V(s_t) on the policy's base: its own adapter in adapter modes, a copy in full mode."""
    hidden = policy.model.config.hidden_size
    if policy.has_adapters:
        cfg = policy.model.peft_config["default"]
        policy.model.add_adapter(
            "value", _lora_config(lora_r or cfg.r, lora_alpha or cfg.lora_alpha, 0.0, policy.model)
        )
        policy.model.set_adapter("default")  # add_adapter leaves the policy adapter active
        return ScalarModel(policy.model, "value", hidden, zero_init=True)
    trunk = copy.deepcopy(policy._ref_model).requires_grad_(True).train()
    return ScalarModel(trunk, None, hidden, zero_init=True)


def load_scalar_model(
    name: str,
    *,
    mode: str = "lora",
    lora_r: int = 16,
    lora_alpha: int = 32,
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """A fresh reward model: base ``name`` + its own adapter (``reward``) + a head. Returns (ScalarModel, tokenizer).

    A folder saved by :meth:`ScalarModel.save` is loaded back with its adapter and head (frozen-ready).
    """
    path = resolve_model_path(name)
    head_file = os.path.join(path, "scalar_head.pt")
    if _is_adapter_dir(path) and os.path.exists(head_file):
        from peft import PeftModel

        base_name, tokenizer = _adapter_base(path, trust_remote_code)
        lm = _load_base(base_name, "qlora" if mode == "qlora" else "lora", device, trust_remote_code)
        lm = PeftModel.from_pretrained(lm, path, adapter_name="reward", is_trainable=True)
        model = ScalarModel(lm, "reward", lm.config.hidden_size)
        model.head.load_state_dict(torch.load(head_file, map_location=model.head.weight.device, weights_only=True))
        model.tokenizer = tokenizer
        return model, tokenizer
    tokenizer = load_tokenizer(name, trust_remote_code)
    lm = _load_base(name, mode, device, trust_remote_code)
    if mode == "full":
        model = ScalarModel(lm, None, lm.config.hidden_size)
        model.tokenizer = tokenizer
        return model, tokenizer
    lm = _add_lora(lm, name, mode, lora_r, lora_alpha, 0.0, adapter="reward")
    model = ScalarModel(lm, "reward", lm.config.hidden_size)
    model.tokenizer = tokenizer
    return model, tokenizer
