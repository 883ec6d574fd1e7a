"""Runs of tests/test_distributed.py: under ``torchrun --nproc_per_node 2`` (gloo, CPU), and in the test's own
process as the one-process reference.

``python tests/dist_worker.py OUT`` writes, for GRPO and DPO, the gradients of every optimizer step, the trained
weights and the logged metrics of one step on a fixed global batch (``OUT/<method>-rank<r>.pt``); then a 3-step SFT
run that rank 1 interrupts with SIGINT after its first step; then ``python -m lab train rm`` through the CLI.

``python tests/dist_worker.py OUT fsdp`` (under ``ACCELERATE_USE_FSDP=true``) runs DPO, GRPO and REINFORCE in full
fine-tuning with the weights sharded, then one step each of sft-preferred, csft, rm and PPO
(``OUT/trainers-rank<r>.pt``: their trained weights, gathered).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def fixed_rollout(policy, prompts, cfg, generator=None, max_new_tokens=None):
    """The rollout of the global batch, sampled from a fixed seed identically on every process, then cut to this
    process's rows: one process and two then train on the same completions. (A real run samples each process's
    prompts from its own stream, ``seed + rank``.)"""
    from accelerate.utils import gather_object

    from lab import dist
    from lab.rollout import rollout

    everyone = gather_object(list(prompts)) if dist.world_size() > 1 else list(prompts)
    gen = torch.Generator(device=policy.device).manual_seed(1234)
    roll = rollout(policy, everyone, cfg, gen, max_new_tokens)
    n = len(prompts)
    return roll.select(slice(dist.rank() * n, (dist.rank() + 1) * n))


class GradientTap:
    """Keeps the gradients each optimizer step used (after the all-reduce and clipping), read at ``zero_grad``."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []
        self._original = torch.optim.AdamW.zero_grad
        tap = self

        def zero_grad(optimizer, set_to_none: bool = True):
            from lab.dist import full_tensor  # under FSDP each rank holds a shard: gathered whole, on every rank

            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grads = [full_tensor(p.grad.detach()).clone() for p in params]
            if grads:
                tap.steps.append(grads)
            tap._original(optimizer, set_to_none)

        torch.optim.AdamW.zero_grad = zero_grad

    def close(self) -> None:
        torch.optim.AdamW.zero_grad = self._original


def trained(policy) -> dict:
    from lab.dist import full_tensor

    return {n: full_tensor(p.detach()).clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def run_grpo(out: Path, mode: str = "lora") -> dict:
    import lab.grpo
    from lab.runner import load_for, seed_everything
    from lab.tasks import get_task

    cfg = lab.grpo.GRPOConfig(
        task="arith",
        mode=mode,
        steps=1,
        batch_size=4,  # 2 prompts a process, 2 completions each: the groups stay whole
        group_size=2,
        loss_norm="token",  # divides by the global token count
        num_iterations=2,  # a second optimizer step on the same rollout: ratio ≠ 1, clipping and ratio/* metrics
        beta=0.05,  # k1_reward: π_old and π_ref shape the reward; kl/ref is a token mean over both processes
        max_new_tokens=6,
        temperature=1.0,
        eval_every=0,
        eval_size=2,
        max_grad_norm=0.0,
        lr=1e-2,
        out=str(out / "runs"),
        run_id="grpo",
    )
    lab.grpo.rollout = fixed_rollout
    seed_everything(cfg.seed)  # the same adapter initialisation in both runs
    policy = load_for(cfg, get_task("arith"))
    tap = GradientTap()
    try:
        metrics = list(lab.grpo.train(cfg, policy=policy))
    finally:
        tap.close()
    return {"grads": tap.steps, "weights": trained(policy), "metrics": metrics}


def run_dpo(out: Path) -> dict:
    from lab.dpo import DPOConfig, _load_policy, train
    from lab.runner import seed_everything
    from lab.tasks import get_task

    cfg = DPOConfig(
        task="bandit",
        mode="full",  # full fine-tuning: every weight's gradient summed over the processes
        steps=1,
        batch_size=4,
        microbatch_size=1,  # gradient accumulation: each pair's share is of the global batch
        kl_every=0,
        eval_every=0,
        max_grad_norm=0.0,
        lr=1e-2,
        out=str(out / "runs"),
        run_id="dpo",
    )
    seed_everything(cfg.seed)
    policy = _load_policy(cfg, get_task("bandit"))
    tap = GradientTap()
    try:
        metrics = list(train(cfg, policy=policy))
    finally:
        tap.close()
    return {"grads": tap.steps, "weights": trained(policy), "metrics": metrics}


def run_reinforce(out: Path) -> dict:
    """One REINFORCE step in full fine-tuning on a fixed rollout: KL-penalized reward (a no-grad π_θ pass and a
    global token mean), the batch-mean baseline of the gathered returns, microbatches of one row."""
    import lab.reinforce
    from lab.runner import load_for, seed_everything
    from lab.tasks import get_task

    cfg = lab.reinforce.ReinforceConfig(
        task="arith",
        mode="full",
        steps=1,
        batch_size=4,
        microbatch_size=1,
        beta=0.05,
        max_new_tokens=6,
        temperature=1.0,
        eval_every=0,
        eval_size=2,
        max_grad_norm=0.0,
        lr=1e-2,
        out=str(out / "runs"),
        run_id="reinforce",
    )
    lab.reinforce.rollout = fixed_rollout
    seed_everything(cfg.seed)
    policy = load_for(cfg, get_task("arith"))
    tap = GradientTap()
    try:
        metrics = list(lab.reinforce.train(cfg, policy=policy))
    finally:
        tap.close()
    return {"grads": tap.steps, "weights": trained(policy), "metrics": metrics}


def weights(module) -> dict:
    """Every parameter of ``module``, gathered whole (the same on every rank)."""
    from lab.dist import full_tensor

    return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters()}


def run_fsdp_trainers(out: Path) -> dict:
    """One step each of sft-preferred, csft, rm and PPO in full fine-tuning, sharded: their trained weights
    gathered (PPO's value model too), to compare with the checkpoints rank 0 saved."""
    from lab import baselines, csft, ppo, rm
    from lab.modeling import add_value_head
    from lab.runner import load_for, seed_everything
    from lab.tasks import get_task

    runs = str(out / "runs")
    common = dict(mode="full", steps=1, batch_size=4, eval_size=2, out=runs)
    result = {}
    for name, train, cfg in (
        ("sft-preferred", baselines.train_preferred, baselines.PreferredSFTConfig(task="bandit", kl_every=0, **common)),
        ("csft", csft.train, csft.CSFTConfig(task="reviews", max_length=48, max_new_tokens=4, **common)),
    ):
        cfg.run_id = name
        policy = load_for(cfg, get_task(cfg.task))
        list(train(cfg, policy=policy))
        result[name] = {"policy": weights(policy.model)}
    cfg = rm.RewardConfig(task="bandit", eval_pairs=8, run_id="rm", **common)
    seed_everything(cfg.seed)
    model = rm.load_reward_backbone(cfg, get_task("bandit"))
    list(rm.train(cfg, policy=model))
    result["rm"] = {"model": weights(model)}
    cfg = ppo.PPOConfig(task="arith", max_new_tokens=6, num_minibatches=1, ppo_epochs=1, run_id="ppo", **common)
    policy = load_for(cfg, get_task("arith"))
    value_model = add_value_head(policy)
    list(ppo.train(cfg, policy=policy, value_model=value_model))
    result["ppo"] = {"policy": weights(policy.model), "value": weights(value_model)}
    return result


def run_sft_interrupted(out: Path) -> None:
    """3 steps; rank 1 alone gets SIGINT after the first: both stop after step 1, and rank 0's record says so."""
    from lab import dist
    from lab.sft import SFTConfig, train

    cfg = SFTConfig(task="arith", steps=3, batch_size=4, kl_every=0, eval_size=4, out=str(out / "runs"), run_id="sft")
    for step, _ in enumerate(train(cfg), start=1):
        if step == 1 and dist.rank() == 1:
            signal.raise_signal(signal.SIGINT)


def main(out: Path, fsdp: bool = False) -> None:
    from lab import dist

    out.mkdir(parents=True, exist_ok=True)
    if fsdp:  # ACCELERATE_USE_FSDP=true: DPO, GRPO and REINFORCE steps with the weights sharded, then the others
        torch.save(run_dpo(out), out / f"dpo-rank{dist.rank()}.pt")
        torch.save(run_grpo(out, mode="full"), out / f"grpo-rank{dist.rank()}.pt")
        torch.save(run_reinforce(out), out / f"reinforce-rank{dist.rank()}.pt")
        torch.save(run_fsdp_trainers(out), out / f"trainers-rank{dist.rank()}.pt")
        return
    results = {"grpo": run_grpo(out), "dpo": run_dpo(out)}
    for method, result in results.items():
        torch.save(result, out / f"{method}-rank{dist.rank()}.pt")
    if dist.world_size() > 1:
        run_sft_interrupted(out)
        from lab.cli import main as cli

        cli(
            ["train", "rm", "--task", "bandit", "--steps", "1", "--batch-size", "4", "--eval-pairs", "8"]
            + ["--out", str(out / "runs"), "--run-id", "rm"]
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), fsdp=sys.argv[2:] == ["fsdp"])
