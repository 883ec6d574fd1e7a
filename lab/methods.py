"""The registry of trainers: method name → (module, config class, train function).

The CLI, the app and the notebooks look methods up here, so a new method is one line in this table.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, tuple[str, str, str]] = {
    "sft": ("lab.sft", "SFTConfig", "train"),
    "rm": ("lab.rm", "RewardConfig", "train"),
    "dpo": ("lab.dpo", "DPOConfig", "train"),
    "sft-preferred": ("lab.baselines", "PreferredSFTConfig", "train_preferred"),
    "csft": ("lab.csft", "CSFTConfig", "train"),
    "reinforce": ("lab.reinforce", "ReinforceConfig", "train"),
    "ppo": ("lab.ppo", "PPOConfig", "train"),
    "grpo": ("lab.grpo", "GRPOConfig", "train"),
}


def available() -> list[str]:
    """Every method name, in the order the CLI and the app list them."""
    return list(METHODS)


def get_method(name: str):
    """(ConfigClass, train_fn) for a method name, with a one-line error listing the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    module, config_name, train_name = METHODS[name]
    mod = importlib.import_module(module)
    return getattr(mod, config_name), getattr(mod, train_name)
