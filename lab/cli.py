"""``python -m lab``: pretrain, train, eval, generate, bon, runs.

Every hyperparameter of ``train METHOD`` is a flag named after its config field (``--beta 0.1``,
``--group-size 8``); ``python -m lab train grpo --help`` lists them with their help text and defaults.
Errors a user can fix (a bad value, a missing model, a malformed data row) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from lab.config import ConfigError, add_config_arguments, config_from_args


def _user_errors():
    """The exceptions that are the user's to fix: shown as one line, never as a traceback."""
    from lab.modeling import ModelNotFound

    from lab.tasks import UnknownTaskError

    errors = [ConfigError, ModelNotFound, FileNotFoundError, UnknownTaskError]
    try:
        from lab.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------------------------------
# train


def cmd_train(method: str, argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from lab.methods import get_method

    config_cls, train = get_method(method)
    parser = argparse.ArgumentParser(prog=f"python -m lab train {method}",
                                     description=(config_cls.__doc__ or "").strip().splitlines()[0]
                                     if config_cls.__doc__ else None)
    add_config_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    cfg = config_from_args(config_cls, args)
    stop = threading.Event()
    headline = ("reward/mean", "loss/dpo", "loss/rm", "loss/sft", "loss/policy", "kl/ref", "accuracy")
    last: dict = {}
    gen = train(cfg, stop=stop)
    bar = tqdm(total=cfg.steps, desc=f"{method} on {cfg.task}", unit="step", dynamic_ncols=True)
    try:
        for metrics in gen:
            last = metrics
            bar.update(1)
            bar.set_postfix({k.split("/")[-1] if k != "kl/ref" else "kl": _fmt(v)
                             for k, v in metrics.items() if k in headline})
    except KeyboardInterrupt:
        # Ctrl-C: close the generator so the run finishes its record as "stopped".
        gen.close()
        bar.close()
        print("stopped; the record is complete up to the last finished step", file=sys.stderr)
    finally:
        bar.close()
    _print_summary(cfg, last)
    return 0


def _print_summary(cfg, last: dict) -> None:
    from lab.records import list_runs

    runs = [r for r in list_runs(cfg.out) if cfg.run_id is None or r.run_id == cfg.run_id]
    if not runs:
        return
    run = max(runs, key=lambda r: str(r.status.get("started", "")))
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


def cmd_eval(args) -> int:
    from lab.evaluate import evaluate
    from lab.modeling import load_policy
    from lab.tasks import get_task

    task = get_task(args.task)
    policy = load_policy(args.model or task.model, mode="lora", device=args.device)
    result = evaluate(policy, task, n=args.n, greedy=not args.sample, seed=args.seed)
    result = {"task": task.name, "model": args.model or task.model, "greedy": not args.sample, **result}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<16} {_fmt(v)}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from lab.modeling import load_policy
    from lab.sampling import generate
    from lab.tasks import get_task

    task = get_task(args.task)
    policy = load_policy(args.model or task.model, mode="lora", device=args.device)
    prompts = args.prompt or task.eval_prompts()[: args.n]
    gen = torch.Generator(device=policy.device).manual_seed(args.seed)
    roll = generate(policy.model, policy.tokenizer, prompts, args.max_new_tokens or task.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, greedy=args.greedy, generator=gen)
    rewards = task.gold_rewards(roll.prompts, roll.completions, roll.truncated.tolist())
    for p, c, r, t in zip(roll.prompts, roll.completions, rewards, roll.truncated.tolist()):
        row = {"prompt": p, "completion": c, "gold_reward": r, "truncated": bool(t)}
        print(json.dumps(row) if args.json else f"{p!r} → {c!r}   gold={r:.3g}{'  (no end)' if t else ''}")
    return 0


def cmd_runs(args) -> int:
    from lab.records import list_runs, load_run, safe_run_dir

    if args.id:
        run = load_run(safe_run_dir(args.out, args.id))
        print(json.dumps({"run_id": run.run_id, "status": run.status, "config": run.config,
                          "steps_logged": len(run.metrics), "last": run.metrics[-1] if run.metrics else None,
                          "samples": len(run.samples)}, indent=2, default=str))
        return 0
    runs = list_runs(args.out)
    if not runs:
        print(f"no runs in {args.out}/")
        return 0
    print(f"{'run':<40} {'method':<14} {'task':<8} {'status':<10} {'steps':>6}")
    for run in runs:
        row = run.summary_row()
        print(f"{str(row.get('id'))[:40]:<40} {str(row.get('method')):<14} {str(row.get('task')):<8} "
              f"{str(row.get('status')):<10} {str(row.get('steps')):>6}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from lab.methods import METHODS

    parser = argparse.ArgumentParser(prog="python -m lab", description="An interactive lab for RL on language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="build a built-in task's tiny base model from scratch (seeded)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="TASK [--steps N] [--seed S] [--out DIR]")

    p = sub.add_parser("train", help=f"train with a method: {', '.join(METHODS)}")
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="config flags; see: train METHOD --help")

    p = sub.add_parser("bon", help="best-of-N with a reward model (no training)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="flags; see: bon --help")

    for name, help_ in (("eval", "score a model on a task's held-out prompts"),
                        ("generate", "sample completions from a model")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--task", default="arith")
        p.add_argument("--model", default=None, help="builtin name, local path, run checkpoint or hub id")
        p.add_argument("--n", type=int, default=None if name == "eval" else 8, help="number of held-out prompts")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "eval":
            p.add_argument("--sample", action="store_true", help="sample at temperature 1 instead of greedy")
        else:
            p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: held-out prompts")
            p.add_argument("--greedy", action="store_true")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--max-new-tokens", type=int, default=None)

    p = sub.add_parser("runs", help="list run records, or inspect one")
    p.add_argument("id", nargs="?", help="a run id to inspect")
    p.add_argument("--out", default="runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    if argv[:1] == ["bon"]:
        # argparse's REMAINDER cannot start with a flag (`bon --reward-model ...`), so bon parses its own flags
        args = argparse.Namespace(command="bon", rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        if args.command == "pretrain":
            from lab.pretrain import main as pretrain_main

            return pretrain_main(args.rest) or 0
        if args.command == "train":
            return cmd_train(args.method, args.rest)
        if args.command == "bon":
            from lab.baselines import bon_main

            return bon_main(args.rest) or 0
        return {"eval": cmd_eval, "generate": cmd_generate, "runs": cmd_runs}[args.command](args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
