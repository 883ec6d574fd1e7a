#!/usr/bin/env bash
# Every GPU check in one go, for a machine with CUDA (prints figures; writes nothing outside $OUT or /tmp):
#   1. QLoRA on CUDA: GRPO and DPO on the Qwen2.5-0.5B-shaped stand-in, a few steps, with memory/peak_gb and
#      time/tokens_per_s from the run records;
#   2. the lab against TRL, the same work, in 4-bit (scripts/bench_trl.py --device cuda --mode qlora), with decode
#      tokens/s and the fraction of the memory-bandwidth roofline.
# Usage: bash scripts/gpu_checks.sh   (about 10 minutes on an H100-class card)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lab-gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m lab make-model --arch qwen2 --size 0.5b --out "$OUT/qwen05"
python - "$OUT" <<'PY'
import json, sys
from lab.data import write_jsonl
out = sys.argv[1]
write_jsonl(f"{out}/gsm.jsonl", [{"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}
                                 for a in range(10) for b in range(10)])
write_jsonl(f"{out}/prefs.jsonl", [{"prompt": [{"role": "user", "content": f"Say {i}."}],
                                    "chosen": [{"role": "assistant", "content": f"{i}."}],
                                    "rejected": [{"role": "assistant", "content": f"No {i}, {i + 1}."}]}
                                   for i in range(64)])
PY
python -m lab train grpo --model "$OUT/qwen05" --mode qlora --task "$OUT/gsm.jsonl" --reward math+format \
    --batch-size 8 --group-size 8 --max-new-tokens 128 --steps 3 --out "$OUT/runs" --run-id grpo-qlora
python -m lab train dpo --model "$OUT/qwen05" --mode qlora --task "$OUT/prefs.jsonl" --batch-size 16 \
    --max-length 512 --steps 3 --eval-size 8 --kl-samples 2 --out "$OUT/runs" --run-id dpo-qlora
python - "$OUT" <<'PY'
import json, sys
for run in ("grpo-qlora", "dpo-qlora"):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/runs/{run}/metrics.jsonl")]
    for m in rows:
        print(run, {k: round(m[k], 3) for k in ("step", "time/step_s", "time/tokens_per_s", "memory/peak_gb") if k in m})
PY
python scripts/bench_trl.py --device cuda --size 0.5b --mode qlora --pairs 2 --steps 3 --cache "$OUT/bench"
