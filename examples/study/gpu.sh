#!/usr/bin/env bash
# The GPU-sized version of the study (examples/study/*.yaml at a scale a GPU makes affordable):
#   bash examples/study/gpu.sh /models/Llama-3.2-1B-Instruct [out_dir]
# The same three sweeps (length, quality, sentences) and the same paired design, with a larger
# model given by its directory, 8 clients x 400 training samples, 1024-token windows, 20 rounds
# x 10 local steps of batch 8, 5 seeds, 500 held-out samples (4% of MedQuAD's 16,407 records;
# local models on 100 of them) and 50 scored greedy answers per cell; then the three reports
# (`cllora report OUT/study/length`, ...).
# Not run on the project's CPU machines (docs/findings.md says which results exist).
set -euo pipefail
MODEL="${1:?usage: gpu.sh MODEL_DIR [OUT_DIR]}"
OUT="${2:-runs-gpu}"
cd "$(dirname "$0")/../.."
COMMON=(
  "model.name=$MODEL" model.dtype=bf16 model.attn=varlen
  data.max_length=1024 data.max_records=20000
  partition.num_clients=8 partition.max_train_per_client=400 partition.max_test_per_client=20
  partition.global_test_fraction=0.04 partition.max_global_test=500
  "partition.length_buckets=[256,512,1024]"
  train.local_steps=10 train.batch_size=8 train.lr=2.0e-4 train.threads=0 train.eval_batch_size=16
  fed.rounds=20 eval.global_rounds=every eval.local_global_samples=100
  eval.generate_samples=50 eval.max_new_tokens=128
  "eval.base_cache=$OUT/study/base_cache" "out_dir=$OUT"
  "sweep.grid.seed=[0,1,2,3,4]"
)
cllora sweep examples/study/length.yaml "${COMMON[@]}"
cllora sweep examples/study/quality.yaml "${COMMON[@]}"
cllora sweep examples/study/sentences.yaml "${COMMON[@]}" "partition.length_buckets=[4,8,16]"
for s in length quality sentences; do cllora report "$OUT/study/$s"; done
