#!/usr/bin/env bash
# The study of examples/study/crn.yaml at GPU scale, over several sizes of one model family:
#   bash examples/study/gpu.sh [--plan-only] OUT_DIR MODEL_DIR MODEL_DIR MODEL_DIR [...]
# e.g. bash examples/study/gpu.sh runs-gpu /models/SmolLM2-135M-Instruct \
#          /models/SmolLM2-360M-Instruct /models/SmolLM2-1.7B-Instruct
# Give at least three sizes of ONE family (same tokenizer and chat template): model size is then
# the only thing that changes between the sweeps. Each size runs the same arms, the same frozen
# endpoints (the study: section is copied unchanged) and the same seeds, scaled up: 8 clients x
# 100 pool samples of at most 1024 tokens, 400 held-out samples (local models on 200), many
# local steps = 4 rounds x 25, few = 50 rounds x 2 (equal total steps), batch 8, bf16.
# Before anything trains, `cllora plan` predicts one training step of each size on GPU (default
# h100; GPU=l40s etc.) and the script prints the study's predicted GPU hours: the roofline with
# kernel launches, a lower bound (measure a real step with `cllora bench` to calibrate it).
# --plan-only prints the estimate and stops. Then per size: cllora sweep, cllora report.
# Not run on the project's CPU machines (docs/findings.md says which results exist).
set -euo pipefail
PLAN_ONLY=0
if [ "${1:-}" = "--plan-only" ]; then PLAN_ONLY=1; shift; fi
OUT="${1:?usage: gpu.sh [--plan-only] OUT_DIR MODEL_DIR MODEL_DIR MODEL_DIR [...]}"
shift
if [ $# -lt 3 ]; then
  echo "gpu.sh: give at least three model directories of one family (got $#)" >&2
  exit 2
fi
GPU="${GPU:-h100}"
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
SPEC="$OUT/crn-gpu.yaml"
python - "$SPEC" <<'EOF'
import sys, yaml
spec = yaml.safe_load(open("examples/study/crn.yaml"))
spec["model"].update(dtype="bf16")
spec["data"].update(max_length=1024, max_records=20000)
spec["partition"].update(num_clients=8, pool=800, global_test_fraction=0.04, max_global_test=400)
spec["train"].update(local_steps=25, batch_size=8, lr=2.0e-4, threads=0, eval_batch_size=16)
spec["fed"].update(rounds=4)
spec["eval"].update(local_global_samples=200)
for arm in spec["sweep"]["arms"].values():  # few local steps at the same total: 50 x 2 = 4 x 25
    if arm.get("train.local_steps") == 2:
        arm.update({"fed.rounds": 50, "train.local_steps": 2})
yaml.safe_dump(spec, open(sys.argv[1], "w"), sort_keys=False)
EOF
echo "predicted GPU time ($GPU, cllora plan; a lower bound):"
for MODEL in "$@"; do
  NAME="$(basename "$MODEL")"
  cllora plan --model "$MODEL" --providers cllora --contexts 1024 --batch 8 --gpu "$GPU" \
    --out "$OUT/plan-$NAME.csv" > "$OUT/plan-$NAME.log"
  python - "$OUT/plan-$NAME.csv" "$SPEC" "$NAME" <<'EOF'
import csv, sys, yaml
step = {r["metric"]: float(r["value"]) for r in csv.DictReader(open(sys.argv[1]))
        if r["metric"] in ("step_s_launch_floor",)}["step_s_launch_floor"]
spec = yaml.safe_load(open(sys.argv[2]))
cells = len(spec["sweep"]["grid"]["seed"]) * len(spec["sweep"]["arms"])
k, rounds, local = spec["partition"]["num_clients"], spec["fed"]["rounds"], spec["train"]["local_steps"]
held, local_held = spec["partition"]["max_global_test"], spec["eval"]["local_global_samples"]
train = k * rounds * local * step
evaluate = (2 * held + k * local_held) / spec["train"]["batch_size"] * step / 3  # forward ~ 1/3
print(f"  {sys.argv[3]}: {step * 1000:.1f} ms per step; {cells} cells x "
      f"{(train + evaluate) / 60:.1f} min = {cells * (train + evaluate) / 3600:.2f} GPU hours")
EOF
done
[ "$PLAN_ONLY" = 1 ] && exit 0
for MODEL in "$@"; do
  NAME="$(basename "$MODEL")"
  cllora sweep "$SPEC" "model.name=$MODEL" "out_dir=$OUT" "sweep.name=study/crn-$NAME"
  cllora report "$OUT/study/crn-$NAME"
done
