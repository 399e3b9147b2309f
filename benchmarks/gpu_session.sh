#!/usr/bin/env bash
# Everything that needs a GPU, in one go, each stage under its own time limit (a lent GPU machine
# gives minutes, not hours): the GPU tests, the kernel micro-benchmarks at Llama-3.1-8B shapes,
# the end-to-end 4-bit benchmark of the Llama-3.1-8B shape at 4k tokens, the max-context search,
# and a short federated run on CUDA with every engine option on.
#
#   bash benchmarks/gpu_session.sh OUT_DIR        # results and logs land in OUT_DIR
#   STAGES="gpu-tests e2e-8b-4bit" bash benchmarks/gpu_session.sh OUT_DIR   # some stages only
#
# The stage limits add up to ~16 minutes, more than one 10-minute call of a lent machine: run it
# as two calls, STAGES="env gpu-tests kernels e2e-8b-4bit" then
# STAGES="real-8b-4bit max-context-8b-4bit fed-run-cuda", on the same warm machine. The `real`
# stage reads MedQuAD JSONL from $REAL_DATA (default ../shared/data/medquad; on a lent machine,
# where ../shared is absent, copy a file or two into an ignored folder of the checkout and carry
# it).
#
# Needs: CUDA, torch, triton, transformers, peft, bitsandbytes (liger-kernel optional) importable;
# cllora and cllora_kernels are imported from this checkout (PYTHONPATH below), installed or not.
# Commit the CSV/PNG files it writes under benchmarks/results/ with the card named.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
STAGES=${STAGES:-env gpu-tests kernels e2e-8b-4bit real-8b-4bit max-context-8b-4bit fed-run-cuda}
LIGER=$(python3 -c "import liger_kernel" 2>/dev/null && echo ",liger-4bit")  # when installed
stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
}
stage env 30 bash -c 'nvidia-smi -L; echo "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-}"; \
python3 -c "import torch, triton, transformers, peft, bitsandbytes; \
print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, \
peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"'
stage gpu-tests 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gpu.py tests/model/test_checkpointing.py \
  tests/model/test_attention.py tests/bench/test_bench.py tests/plan/test_allocator_gpu.py
stage kernels 100 python3 benchmarks/bench_kernels.py --dims llama-3.1-8b --tokens 4096,16384 \
  --reps 10 --out "$OUT/kernels-gpu.csv"
stage e2e-8b-4bit ${E2E_LIMIT:-240} python3 benchmarks/bench_e2e.py --device cuda --dtype bf16 \
  --model llama-3.1-8b --providers ${E2E_PROVIDERS:-cllora-4bit,cllora-4bit-nockpt,cllora-4bit-keepattn,hf-peft-4bit$LIGER} --workloads fixed \
  --contexts 4096 --steps 3 --out-dir "$OUT"
stage real-8b-4bit ${REAL_LIMIT:-150} python3 benchmarks/bench_e2e.py --device cuda --dtype bf16 \
  --model llama-3.1-8b --providers cllora-4bit,hf-peft-4bit --workloads real --contexts 4096 \
  --real-batch 8 --steps 3 --data "${REAL_DATA:-../shared/data/medquad}" --out-dir "$OUT"
stage max-context-8b-4bit ${MAXCTX_LIMIT:-200} python3 benchmarks/bench_e2e.py --device cuda --dtype bf16 \
  --model llama-3.1-8b --providers ${MAXCTX_PROVIDERS:-cllora-4bit,cllora-4bit-offload,hf-peft-4bit} --workloads fixed --contexts "" \
  --find-max-context --budget-gb 24 --max-context-hi 65536 --out-dir "$OUT"
stage fed-run-cuda 60 python3 -m cllora run examples/demo.yaml model.name=smollm2-135m-shape \
  model.attn=varlen train.packing=true train.checkpointing=true train.checkpoint_offload=true model.quant=nf4 fed.rounds=1 \
  lora.dropout=0 train.local_steps=2 partition.max_train_per_client=8 \
  partition.max_test_per_client=4 \
  quality.score_samples=2 out_dir=/tmp/cllora-runs progress=false
tail -n 25 "$LOG"
