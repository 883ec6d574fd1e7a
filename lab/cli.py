"""``python -m lab``: pretrain, train, eval, generate, bon, runs.

Every hyperparameter of ``train METHOD`` is a flag named after its config field (``--beta 0.1``,
``--group-size 8``); ``python -m lab train grpo --help`` lists them with their help text and defaults.
``train METHOD --resume RUN`` goes on with a run from its newest checkpoint, with the run's own settings (flags given
next to it may change its step count and how often it logs, saves and reports).
Errors a user can fix (a bad value, a missing model, a malformed data row: any ``lab.errors.UserError``, and
argparse's own) print one line and exit with code 2. What can be checked before the model loads is checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from lab import dist
from lab.config import ArgumentParser, ConfigError, add_config_arguments, config_from_args
from lab.errors import UserError


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------------------------
# train


def cmd_train(method: str, argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from lab.methods import get_method
    from lab.runner import start

    config_cls, train = get_method(method)
    parser = ArgumentParser(
        prog=f"python -m lab train {method}",
        description=(config_cls.__doc__ or "").strip().splitlines()[0] if config_cls.__doc__ else None,
    )
    add_config_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    cfg = train_config(config_cls, args)
    check_before_loading(cfg)
    dist.init()  # under torchrun / accelerate launch: join the other processes before loading (lab.dist)
    stop = threading.Event()
    ctrl_c: list[int] = []  # the Ctrl-C presses this run got
    previous_sigint = _stop_on_ctrl_c(stop, ctrl_c)
    headline = ("reward/mean", "loss/dpo", "loss/rm", "loss/sft", "loss/policy", "kl/ref", "accuracy")
    last: dict = {}
    gen = start(train, cfg, stop=stop)  # the record exists now: gen.path is where this run writes
    if gen.path is not None:
        resumed = f" (resumed after step {gen.resumed_from})" if gen.resumed_from is not None else ""
        print(f"run {gen.path}{resumed}", flush=True)  # stdout: stderr is for the bar and one-line errors
    bar = None  # made at the first step, so an error while loading prints its one line and no empty bar
    try:
        for metrics in gen:
            last = metrics
            if bar is None:
                bar = tqdm(
                    initial=metrics["step"] - 1,  # a resumed run starts part-way
                    total=cfg.steps,
                    desc=f"{method} on {cfg.task}",
                    unit="step",
                    dynamic_ncols=True,
                    disable=not dist.is_main(),  # several processes (lab.dist): rank 0 prints
                )
            bar.update(1)
            bar.set_postfix(
                {k.split("/")[-1] if k != "kl/ref" else "kl": _fmt(v) for k, v in metrics.items() if k in headline}
            )
    except KeyboardInterrupt:
        # a second Ctrl-C: close the generator so the run finishes its record as "stopped"
        ctrl_c.append(signal.SIGINT)
        gen.close()
        if bar is not None:
            bar.close()
        print("stopped; the record is complete up to the last finished step", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
        dist.close()
    if gen.path is not None and gen.path.is_dir():
        _print_summary(gen.path, last)
        return _exit_code(gen.path, ctrl_c)
    return 0


def _exit_code(path, ctrl_c: list[int]) -> int:
    """0 for a run that ended; for one a signal stopped, the shell's code for that signal (130 for Ctrl-C, 143 for
    SIGTERM), so a scheduler or a script tells a stopped run from a finished one (its record is complete either
    way, and ``--resume`` goes on with it). Under a launcher every process exits 0: torchrun would take a non-zero
    code from one process as a failure and end the others while they save."""
    from lab.records import load_run

    if dist.world_size() > 1 or (load_run(path).status or {}).get("status") != "stopped":
        return 0
    return 128 + (signal.SIGINT if ctrl_c else signal.SIGTERM)


def _stop_on_ctrl_c(stop: threading.Event, presses: list[int]):
    """First Ctrl-C: the run ends after its current step, as with SIGTERM (status ``stopped``, a checkpoint with its
    trainer state, the after-evaluation and the last step's samples). A second one stops at once. Returns the
    handler it replaced (None where it installs none: under a launcher, where `lab.runner.Run` handles it on
    every process, or off the main thread)."""
    if dist.world_size() > 1 or threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame):
        presses.append(signum)
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("Ctrl-C: stopping after the current step, then saving (press it again to stop at once)",
              file=sys.stderr, flush=True)  # fmt: skip

    return signal.signal(signal.SIGINT, on_sigint)


def train_config(config_cls, args: argparse.Namespace):
    """The config of ``train``: the flags given over the defaults or, with ``--resume``, over the resumed run's own
    settings (``BaseConfig.resuming``), so a resumed run needs no flag but the run."""
    import dataclasses

    if getattr(args, "resume", None) is None:
        return config_from_args(config_cls, args)
    names = {f.name for f in dataclasses.fields(config_cls)} - {"resume"}
    return config_cls.resuming(args.resume, **{k: v for k, v in vars(args).items() if k in names})


def check_before_loading(cfg) -> None:
    """What can be checked before the model loads, so a typo costs no loading time and leaves no run folder: the
    task is built in or a data source, and the run id and --out can hold the record (a resumed run's was checked
    when its config was made)."""
    from lab.records import check_run_target
    from lab.tasks import get_task

    if _is_builtin_task(cfg.task):
        get_task(cfg.task)  # an unknown name fails here, named, instead of as "reward 'gold' needs a built-in task"
    if dist.is_main() and cfg.resume is None:  # several processes: rank 0 makes the folder (another would race)
        check_run_target(cfg.out, cfg.run_id)


def _print_summary(path, last: dict) -> None:
    from lab.records import load_run

    run = load_run(path)
    print(f"\nrun      {run.path}")
    print(f"status   {run.status.get('status')}  steps {run.status.get('steps', last.get('step'))}")
    summary = run.status.get("summary") or {}
    if "wall_time_s" in summary:
        print(f"time     {summary['wall_time_s']} s")
    for k, v in last.items():
        if k not in ("step", "time/elapsed"):
            print(f"  {k:<24} {_fmt(v)}")
    for key in ("before", "after", "eval"):
        if key in summary:
            print(f"{key:<8} " + "  ".join(f"{k}={_fmt(v)}" for k, v in summary[key].items()))


# ----------------------------------------------------------------------------------------------------------------------
# eval, generate, runs


def _is_builtin_task(name: str | None) -> bool:
    """None (the default task) or a name that is not a data source: unknown names fail in ``get_task`` with the
    list of built-in tasks, instead of being read as a file."""
    from lab.data import is_data_source

    return name is None or not is_data_source(name)


def _own_data(args):
    """For ``--task jsonl:PATH`` / ``hf:ID`` / a data file: (prompts, columns) of the first ``--n`` rows of the
    split, and the reward to score them with (``--reward``: math, a reward model, python:module:function)."""
    from lab.data import load_rows, prompt_columns
    from lab.rewards import make_reward

    if args.model is None:
        raise ConfigError(f"model: --task {args.task} is your own data, so give the model to use: --model ID_OR_PATH")
    reward_fn = make_reward(args.reward) if args.reward else None
    rows = [dict(r) for r in load_rows(args.task, format="prompt_only", split=args.split)][: args.n or 64]
    return [r["prompt"] for r in rows], prompt_columns(rows), reward_fn


def _load_checked(args, prompts: list):
    """The policy of ``--model``, after checking (before the model loads) that its tokenizer can render the
    prompts: chat messages need a chat template."""
    from lab.modeling import load_policy
    from lab.runner import use_one_thread_for_tiny_models

    policy = load_policy(args.model, mode="lora", device=args.device, prompts=prompts)
    use_one_thread_for_tiny_models(policy)
    return policy


def cmd_eval(args) -> int:
    from lab.evaluate import evaluate, evaluate_prompts
    from lab.rollout import OWN_DATA_MAX_NEW_TOKENS
    from lab.tasks import get_task

    if _is_builtin_task(args.task):
        task = get_task(args.task or "arith")
        policy = _load_checked(argparse.Namespace(**{**vars(args), "model": args.model or task.model}), [])
        result = evaluate(policy, task, n=args.n, greedy=not args.sample, seed=args.seed)
        result = {"task": task.name, "model": args.model or task.model, "greedy": not args.sample, **result}
    else:
        prompts, columns, reward_fn = _own_data(args)
        policy = _load_checked(args, prompts)
        result = evaluate_prompts(
            policy,
            prompts,
            reward_fn,
            columns,
            greedy=not args.sample,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens or OWN_DATA_MAX_NEW_TOKENS,
        )
        result.pop("rows")
        result = {
            "task": args.task,
            "model": args.model,
            "reward": getattr(reward_fn, "name", None),
            "greedy": not args.sample,
            **result,
        }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<16} {_fmt(v)}")
    return 0


def cmd_generate(args) -> int:
    """Sample from a model. ``--prompt`` texts become a user turn of the model's chat template when it has one
    (``--raw`` sends them as they are); with ``--task`` the prompts are the task's (or your data's) and are scored
    with its reward."""
    from lab.evaluate import evaluate_prompts
    from lab.modeling import load_tokenizer
    from lab.rollout import OWN_DATA_MAX_NEW_TOKENS
    from lab.tasks import get_task

    reward_fn, columns, task = None, None, None
    if args.prompt:
        model = args.model or get_task(args.task or "arith").model
        args = argparse.Namespace(**{**vars(args), "model": model})
        templated = bool(getattr(load_tokenizer(model), "chat_template", None)) and not args.raw
        prompts = [[{"role": "user", "content": p}] if templated else p for p in args.prompt]
        if args.task is not None and _is_builtin_task(args.task):
            task = get_task(args.task)
        elif args.reward:
            from lab.rewards import make_reward

            reward_fn = make_reward(args.reward)
    elif _is_builtin_task(args.task):
        task = get_task(args.task or "arith")
        args = argparse.Namespace(**{**vars(args), "model": args.model or task.model})
        prompts = task.eval_prompts()[: args.n]
    else:
        prompts, columns, reward_fn = _own_data(args)
    if task is not None:
        from lab.rewards import make_reward

        reward_fn = make_reward(args.reward or "gold", task)
    policy = _load_checked(args, prompts)
    max_new = args.max_new_tokens or (task.max_new_tokens if task is not None else OWN_DATA_MAX_NEW_TOKENS)
    if not args.greedy:  # sampling at the given temperature and top-p
        from lab.sampling import generate

        gen = torch_generator(policy, args.seed)
        roll = generate(
            policy.model,
            policy.tokenizer,
            prompts,
            max_new,
            temperature=args.temperature,
            top_p=args.top_p,
            generator=gen,
        )
        from lab.rollout import score

        rewards = score(reward_fn, roll, columns).tolist() if reward_fn is not None else [None] * len(roll)
        rows = [
            {"prompt": p, "completion": c, "truncated": bool(t), **({"reward": r} if r is not None else {})}
            for p, c, t, r in zip(roll.prompts, roll.completions, roll.truncated.tolist(), rewards)
        ]
    else:
        rows = evaluate_prompts(policy, prompts, reward_fn, columns, max_new_tokens=max_new, seed=args.seed)["rows"]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            reward = f"   reward={row['reward']:.3g}" if "reward" in row else ""
            print(f"{row['prompt']!r} → {row['completion']!r}{reward}{'  (no end)' if row['truncated'] else ''}")
    return 0


def torch_generator(policy, seed: int):
    import torch

    return torch.Generator(device=policy.device).manual_seed(seed)


def cmd_runs(args) -> int:
    from lab.records import list_runs, load_run, safe_run_dir

    if args.id:
        run = load_run(safe_run_dir(args.out, args.id))
        print(
            json.dumps(
                {
                    "run_id": run.run_id,
                    "status": run.status,
                    "config": run.config,
                    "steps_logged": len(run.metrics),
                    "last": run.metrics[-1] if run.metrics else None,
                    "samples": len(run.samples),
                    "resumable": run.resumable,  # python -m lab train METHOD --resume ID goes on from checkpoint_step
                    "checkpoint_step": run.checkpoint_step,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    runs = list_runs(args.out)
    if not runs:
        print(f"no runs in {args.out}/")
        return 0
    print(f"{'run':<40} {'method':<14} {'task':<8} {'status':<11} {'steps':>6}  resume")
    for run in runs:
        row = run.summary_row()
        # resumable: stopped, interrupted or failed with a checkpoint and steps left (train METHOD --resume ID)
        resume = f"from step {row['checkpoint_step']}" if row["resumable"] else ""
        print(
            f"{str(row.get('id'))[:40]:<40} {str(row.get('method')):<14} {str(row.get('task')):<8} "
            f"{str(row.get('status')):<11} {str(row.get('steps')):>6}  {resume}"
        )
    if any(run.resumable for run in runs):
        print(f"\ngo on with a run: python -m lab train METHOD --resume RUN_ID --out {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from lab.methods import METHODS

    parser = ArgumentParser(prog="python -m lab", description="An interactive lab for RL on language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="build a built-in task's tiny base model from scratch (seeded)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="TASK [--steps N] [--seed S] [--out DIR]")

    p = sub.add_parser("make-model", help="write a random qwen2/llama/gpt2 model with its tokenizer (no download)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--arch ARCH --size SIZE --out DIR [--seed S]")

    p = sub.add_parser("train", help=f"train with a method: {', '.join(METHODS)}")
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="config flags; see: train METHOD --help")

    p = sub.add_parser("bon", help="best-of-N with a reward model (no training)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="flags; see: bon --help")

    for name, help_ in (
        ("eval", "score a model on a task's held-out prompts"),
        ("generate", "sample completions from a model"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            "--task",
            default=None,
            help="built-in task (default arith), or your data: jsonl:PATH, "
            "a .jsonl/.json/.parquet/.csv file, hf:ID[:CONFIG]",
        )
        p.add_argument("--model", default=None, help="builtin name, local path, run checkpoint or hub id")
        p.add_argument("--n", type=int, default=None if name == "eval" else 8, help="number of held-out prompts")
        p.add_argument(
            "--reward",
            default=None,
            help="for your own data: math, format, a reward-model path or python:module:function",
        )
        p.add_argument("--split", default="test", help="split of a hub dataset (files have one)")
        p.add_argument("--max-new-tokens", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "eval":
            p.add_argument("--sample", action="store_true", help="sample at temperature 1 instead of greedy")
        else:
            p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: held-out prompts")
            p.add_argument("--raw", action="store_true", help="send --prompt as it is, without the chat template")
            p.add_argument("--greedy", action="store_true")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-p", type=float, default=1.0)

    p = sub.add_parser("runs", help="list run records, or inspect one")
    p.add_argument("id", nargs="?", help="a run id to inspect")
    p.add_argument("--out", default="runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    if argv[:1] in (["bon"], ["make-model"], ["pretrain"]):
        # argparse's REMAINDER cannot start with a flag (`bon --reward-model ...`), so these parse their own flags
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        if args.command == "pretrain":
            from lab.pretrain import main as pretrain_main

            return pretrain_main(args.rest) or 0
        if args.command == "make-model":
            from lab.zoo import main as zoo_main

            return zoo_main(args.rest) or 0
        if args.command == "train":
            return cmd_train(args.method, args.rest)
        if args.command == "bon":
            from lab.baselines import bon_main

            return bon_main(args.rest) or 0
        return {"eval": cmd_eval, "generate": cmd_generate, "runs": cmd_runs}[args.command](args)
    except UserError as err:
        print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}", file=sys.stderr)
        return 2
