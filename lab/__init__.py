"""lab: reinforcement learning on language models — reward models, PPO, DPO, GRPO — small enough to read.

Start with ``python -m lab --help``, the notebooks, or ``python app.py``. Each method is one module:
``lab.sft``, ``lab.rm``, ``lab.dpo``, ``lab.baselines``, ``lab.reinforce``, ``lab.ppo``, ``lab.grpo``.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes announces, on CPUs with AVX512-BF16, that an optional hub kernel is missing; its own fallback is used.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
