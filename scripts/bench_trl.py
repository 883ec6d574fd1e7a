"""The lab's GRPO and DPO steps side by side with TRL's, on the same ~100M random model, one CPU thread each.

    python scripts/bench_trl.py                       # 100M model, GRPO and DPO, 3 interleaved pairs (minutes)
    python scripts/bench_trl.py --size tiny --pairs 1 --steps 2   # a quick check
    python scripts/bench_trl.py --decode-only         # on CUDA: decode tokens/s and the HBM roofline fraction
    python scripts/bench_trl.py --device cuda --size 0.5b --mode qlora   # a GPU: Qwen2.5-0.5B's shape in 4-bit

Same work on both sides: the same model folder (a Qwen2-shaped random model with a ≥ 32k vocabulary: the lab's zoo
`python -m lab make-model --arch qwen2 --size 100m` when it is there, else one built here), the same LoRA (r, alpha,
all linear layers), the same prompts or pairs, the same G, completion length cap, batch, learning rate and loss
(GRPO: TRL's default loss_type "dapo" = the lab's loss_norm "token", β = 0, one update per rollout; DPO: sigmoid,
β = 0.1, reference = adapter switched off). A random model almost never emits EOS, so every completion runs to the
cap on both sides. Each side runs in its own subprocess (so its peak RSS is its own), lab and TRL alternate over
`--pairs` pairs (the first of each pair swaps), the first step of each process is a warm-up and is not counted,
and the table shows per-step medians over all counted steps.

This is a script, not a test: it takes minutes at 100M.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `lab` from this checkout, when run as `python scripts/bench_trl.py`
# Memory bandwidth of the card, bytes/s, by a substring of torch.cuda.get_device_name() (first match wins).
HBM_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.04e12),
    ("A100", 1.56e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("4090", 1.01e12),
    ("T4", 0.32e12),
]
# Built-in model shapes (used when lab.zoo is not there), Qwen2-style: tied embeddings, GQA, 32k words.
SHAPES = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "20m": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "100m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 10,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
}
VOCAB = 32_000


def reward_len(completions, **kwargs):
    """The reward both trainers use: the completion's length in characters (cheap, deterministic)."""
    return [float(len(c)) for c in completions]


# ----------------------------------------------------------------------------------------------------------------------
# The model and the data


def build_model(size: str, out: Path, source: str) -> str:
    """Write the benchmark model to `out` once; returns a description."""
    if (out / "config.json").exists():
        return json.loads((out / "bench.json").read_text())["source"]
    out.mkdir(parents=True, exist_ok=True)
    made = None
    if source in ("auto", "zoo") and size in ("tiny", "100m", "0.5b"):
        try:
            from lab.zoo import make_model

            make_model("qwen2", size, out)
            made = f"lab.zoo qwen2 {size}"
        except Exception as err:  # the zoo is optional here; the built-in shapes below always work
            if source == "zoo":
                raise
            print(f"lab.zoo unavailable ({type(err).__name__}: {err}); building the model here", file=sys.stderr)
    if made is None:
        made = _build_builtin(size, out)
    (out / "bench.json").write_text(json.dumps({"source": made}))
    return made


def _build_builtin(size: str, out: Path) -> str:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    # A byte-level BPE (what AutoTokenizer rebuilds a qwen2 folder's tokenizer as), trained on synthetic words
    # until it has a 32k vocabulary.
    bpe = ByteLevelBPETokenizer()
    words = [f"w{i}" for i in range(60_000)]
    bpe.train_from_iterator(
        [" ".join(words[i : i + 100]) for i in range(0, len(words), 100)],
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok),
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
        **SHAPES[size],
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return f"built here: Qwen2 {size}"


def make_texts(tokenizer, n: int, length: int, seed: int) -> list[str]:
    """n texts of about `length` tokens: random ordinary tokens, decoded."""
    import random

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 30_000)) if i not in special]
    texts = []
    for _ in range(n):
        text = tokenizer.decode([rng.choice(vocab) for _ in range(length)], skip_special_tokens=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]  # BPE may merge across the joins
        texts.append(tokenizer.decode(ids))
    return texts


def write_data(model_dir: Path, args, data_dir: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_texts(tok, 64, args.prompt_len, seed=1)
    answers = make_texts(tok, 128, args.completion_len, seed=2)
    grpo = data_dir / "prompts.jsonl"
    grpo.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    dpo = data_dir / "pairs.jsonl"
    dpo.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": answers[2 * i], "rejected": answers[2 * i + 1]}) + "\n"
            for i, p in enumerate(prompts)
        )
    )
    return grpo, dpo


# ----------------------------------------------------------------------------------------------------------------------
# Workers: one trainer, one process; prints RESULT {json}


def _peak_rss_mb() -> float:
    """Peak memory of this worker: the most torch allocated on the GPU, or the peak resident set on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_lab(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from lab import dpo, grpo

    common = {
        "model": args.model_dir,
        "mode": args.mode,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lr": 1e-5,
        "steps": args.steps + 2,
        "seed": 0,
        "out": args.out,
        "device": args.device,
        "sample_every": 0,
        "log_every": 1000,
        "gradient_checkpointing": False,
        # TRL computes no KL diagnostic at β = 0: the lab's per-step kl/ref pass is left out for equal work
        "kl_every": 0,
    }
    if args.method == "grpo":
        cfg = grpo.GRPOConfig(
            task=f"jsonl:{args.data}",
            reward="python:bench_trl:reward_len",
            batch_size=args.prompts,
            group_size=args.group_size,
            max_new_tokens=args.completion_len,
            loss_norm="token",
            beta=0.0,
            eval_every=0,
            eval_size=1,
            **common,
        )
        steps = grpo.train(cfg)
    else:
        cfg = dpo.DPOConfig(
            task=f"jsonl:{args.data}",
            batch_size=args.pairs_per_step,
            loss_type="sigmoid",
            beta=0.1,
            max_length=4 * (args.prompt_len + args.completion_len),
            eval_every=0,
            eval_size=1,
            kl_samples=1,
            max_new_tokens=1,
            **common,
        )
        steps = dpo.train(cfg)
    times = []
    start = time.perf_counter()
    for _ in range(args.steps + 1):
        next(steps)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    steps.close()
    # The first step warms up. (A run's last step also runs the held-out evaluation; it is never reached here.)
    return {"times": times[1:], "rss_mb": _peak_rss_mb()}


def _trl_common_args(args) -> dict:
    """The TrainingArguments both TRL trainers get: the lab's settings (constant lr, clipping at 1, no logging, no
    saving) and, on a GPU, the lab's dtype: bf16 where native, 4-bit nf4 with double quantization for qlora."""
    import torch

    gpu = args.device == "cuda"
    bf16 = gpu and torch.cuda.is_bf16_supported()
    common = {
        "output_dir": args.out,
        "learning_rate": 1e-5,
        "max_steps": args.steps + 1,
        "use_cpu": not gpu,
        "bf16": bf16,
        "fp16": False,
        "report_to": "none",
        "logging_steps": 10_000,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        "gradient_accumulation_steps": 1,
        "dataloader_num_workers": 0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "weight_decay": 0.0,
        "gradient_checkpointing": False,
    }
    if gpu:  # as lab.modeling loads the base
        init = {"dtype": torch.bfloat16 if bf16 else torch.float16}
        if args.mode == "qlora":
            from transformers import BitsAndBytesConfig

            init["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=init["dtype"],
            )
        common["model_init_kwargs"] = init
    return common


def _trl_trainer(args, data, tok, peft_config, callbacks: list):
    """TRL's GRPOTrainer or DPOTrainer, set up as the lab's run it is compared with."""
    common = _trl_common_args(args)
    if args.method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(
            per_device_train_batch_size=args.prompts * args.group_size,
            num_generations=args.group_size,
            max_completion_length=args.completion_len,
            temperature=1.0,
            top_p=1.0,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            **common,
        )
        return GRPOTrainer(
            model=args.model_dir,
            reward_funcs=reward_len,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(
        per_device_train_batch_size=args.pairs_per_step,
        beta=0.1,
        loss_type="sigmoid",
        max_length=4 * (args.prompt_len + args.completion_len),
        **common,
    )
    return DPOTrainer(
        model=args.model_dir,
        args=cfg,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def worker_trl(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    data = load_dataset("json", data_files=str(args.data), split="train")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    timer = StepTimes()
    _trl_trainer(args, data, tok, peft_config, [timer]).train()
    return {"times": timer.times[1:], "rss_mb": _peak_rss_mb()}


# ----------------------------------------------------------------------------------------------------------------------
# CUDA: decode throughput against the memory roofline


def decode_roofline(args) -> list[str]:
    """Decode tokens/s at batch 64 with the lab's sampler and HF generate, and the fraction of the HBM roofline:
    every decode step reads every weight once, so steps/s ≤ bandwidth / weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lab.sampling import generate

    name = torch.cuda.get_device_name()
    bandwidth = args.bandwidth or next((bw for key, bw in HBM_BANDWIDTH if key in name), None)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tied = model.config.tie_word_embeddings
    # Bytes read per step: all weights, except that an untied input embedding only reads B rows.
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if tied or "embed_tokens" not in n
    )
    prompts = make_texts(tok, 64, args.prompt_len, seed=3)
    T = args.decode_tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for label, run in [
        ("lab generate", lambda: generate(model, tok, prompts, T, generator=gen)),
        ("HF generate", lambda: _hf_generate(model, tok, prompts, T)),
    ]:
        run()  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        steps = out if isinstance(out, int) else out.completion_ids.shape[1]
        tokens_per_s = 64 * steps / seconds
        frac = (weight_bytes * steps / seconds) / bandwidth if bandwidth else float("nan")
        rows.append(f"| {label} | 64 | {steps} | {tokens_per_s:,.0f} | {frac:.1%} |")
    title = (
        f"Decode on {name} (bf16, weights {weight_bytes / 1e6:.0f} MB, bandwidth "
        f"{bandwidth / 1e12 if bandwidth else float('nan'):.2f} TB/s; prefill included):"
    )
    header = [title, "", "| sampler | batch | tokens/row | tokens/s | HBM roofline |", "|---|---|---|---|---|"]
    return header + rows


def _hf_generate(model, tok, prompts, T) -> int:
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=True, max_new_tokens=T, min_new_tokens=T, top_k=0, pad_token_id=tok.pad_token_id
        )
    return out.shape[1] - enc["input_ids"].shape[1]


# ----------------------------------------------------------------------------------------------------------------------
# Driver


def run_worker(side: str, method: str, args, data: Path, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--method",
        method,
        "--model-dir",
        str(args.model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
    ]
    cmd += [
        "--prompts",
        str(args.prompts),
        "--group-size",
        str(args.group_size),
        "--pairs-per-step",
        str(args.pairs_per_step),
        "--prompt-len",
        str(args.prompt_len),
        "--completion-len",
        str(args.completion_len),
        "--lora-r",
        str(args.lora_r),
        "--lora-alpha",
        str(args.lora_alpha),
        "--device",
        args.device,
        "--mode",
        args.mode,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'scripts'}",
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size",
        default="100m",
        choices=sorted(SHAPES) + ["0.5b"],
        help="model size (0.5b: lab.zoo's Qwen2.5-0.5B shape)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides train")
    p.add_argument("--mode", default="lora", choices=("lora", "qlora"), help="qlora: a 4-bit base (CUDA)")
    p.add_argument(
        "--model-source",
        default="auto",
        choices=("auto", "zoo", "builtin"),
        help="auto: lab.zoo's qwen2 when it can build that size, else the built-in shapes",
    )
    p.add_argument("--methods", default="grpo,dpo")
    p.add_argument("--pairs", type=int, default=3, help="lab/TRL process pairs, interleaved")
    p.add_argument("--steps", type=int, default=3, help="counted steps per process (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=2, help="GRPO: distinct prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="GRPO: G completions per prompt")
    p.add_argument("--pairs-per-step", type=int, default=8, help="DPO: preference pairs per step")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--completion-len", type=int, default=32, help="GRPO: max new tokens; DPO: answer tokens")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--decode-only", action="store_true", help="only the CUDA decode measurement")
    p.add_argument("--decode-tokens", type=int, default=128, help="CUDA: new tokens per row")
    p.add_argument("--bandwidth", type=float, default=None, help="CUDA: HBM bytes/s (default: by device name)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lab-bench"), help="model folder cache")
    # internal: one worker process
    p.add_argument("--worker", choices=("lab", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = (worker_lab if args.worker == "lab" else worker_trl)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    model_dir = Path(args.cache) / f"{args.model_source}-{args.size}"
    source = build_model(args.size, model_dir, args.model_source)
    args.model_dir = str(model_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    print(f"model: {source}, {n_params / 1e6:.1f}M parameters, vocabulary {config.vocab_size}", flush=True)

    import torch

    lines = []
    if torch.cuda.is_available():
        lines += decode_roofline(args) + [""]
    if not args.decode_only:
        lines += bench_cpu(args)
    print("\n".join(lines))
    return 0


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bench_cpu(args) -> list[str]:
    rows = [
        "| method | work per step | lab s/step | TRL s/step | lab/TRL | lab peak RSS | TRL peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grpo_data, dpo_data = write_data(Path(args.model_dir), args, tmp)
        for method in args.methods.split(","):
            data = grpo_data if method == "grpo" else dpo_data
            results = {"lab": [], "trl": []}
            for pair in range(args.pairs):
                order = ["lab", "trl"] if pair % 2 == 0 else ["trl", "lab"]
                for side in order:
                    r = run_worker(side, method, args, data, tmp / f"{side}-{method}-{pair}")
                    results[side].append(r)
                    print(
                        f"  {method} pair {pair} {side}: steps {[round(t, 2) for t in r['times']]} s, "
                        f"peak RSS {r['rss_mb']:.0f} MB",
                        flush=True,
                    )
            med = {s: statistics.median(t for r in results[s] for t in r["times"]) for s in results}
            rss = {s: max(r["rss_mb"] for r in results[s]) for s in results}
            if method == "grpo":
                work = f"{args.prompts} prompts × G={args.group_size}, P={args.prompt_len}, T={args.completion_len}"
            else:
                work = f"{args.pairs_per_step} pairs, P={args.prompt_len}, answers {args.completion_len}"
            rows.append(
                f"| {method.upper()} | {work} | {med['lab']:.2f} | {med['trl']:.2f} | "
                f"{med['lab'] / med['trl']:.2f} | {rss['lab']:.0f} MB | {rss['trl']:.0f} MB |"
            )
    where = "CPU, 1 thread each" if args.device == "cpu" else f"CUDA ({args.mode})"
    memory = "peak RSS" if args.device == "cpu" else "peak GPU memory allocated"
    title = (
        f"{where}, LoRA r={args.lora_r} α={args.lora_alpha} on all linear layers, "
        f"{args.pairs} interleaved process pairs × {args.steps} counted steps (medians; memory: {memory}):"
    )
    header = [title, ""]
    return header + rows


if __name__ == "__main__":
    sys.exit(main())
