#!/bin/bash
# Check a GPU node in one bounded run (~10 min on one H100/H200): the 0.5B-shape rollout and update benchmark alone on
# the GPU, then the test suite and the three toys under torchrun (niced) beside more benchmarks (bf16 updates, the
# 256 x (128 + 768) and Qwen2.5-1.5B rollout shapes) and the GR precision ladder. Each part has a time limit; logs go
# to $OUT (default runs/gpu_check). Models are random, built from configs: no hub access needed.
#     bash benchmarks/gpu_check.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
if [ -d .whl ]; then  # an offline node: the pinned packages it lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)"
} > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
B="python3 benchmarks/bench_step.py --threads 0 --gen-dtype bfloat16 --bandwidth-gbs 4800"
el "A: 0.5b, 64 x (128 + 128), fp32 updates, every generator"
timeout -k 5 230 $B --sizes 0.5b --n-seqs 64 --prompt-len 128 --completion-len 128 --repeats 3 \
  --gens ours,graphed,hf,hf_static > "$OUT/bench_a.txt" 2>&1; el "A rc $?"
el "B: the suite, the toys and the precision ladder in the background"
( timeout -k 5 330 nice python3 -m pytest -q -rs --durations=15 -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
  echo "pytest rc $?" >> "$OUT/pytest.txt" ) &
( for s in train_math train_judge train_tldr; do
    el "$s"; timeout -k 5 130 nice python3 -m torch.distributed.run --nproc_per_node=1 --master_port=29650 $s.py \
      --preset toy --out-dir "$OUT/toy_$s" --overwrite 2>&1 | grep -v "it/s\]$"; el "$s rc ${PIPESTATUS[0]}"
  done > "$OUT/toys.txt" 2>&1 ) &
( timeout -k 5 250 nice python3 benchmarks/gr_precision.py --device cuda --sizes 100m,0.5b,1.5b --no-hvp \
    > "$OUT/precision.txt" 2>&1; echo "precision rc $?" >> "$OUT/precision.txt" ) &
timeout -k 5 80 $B --sizes 0.5b --n-seqs 64 --prompt-len 128 --completion-len 128 --repeats 3 \
  --update-dtype bfloat16 --gen-tokens 8 --gens ours > "$OUT/bench_b.txt" 2>&1; el "bf16 updates rc $?"
timeout -k 5 120 $B --sizes 0.5b --gen-only --gen-shape 256x128+768 --repeats 2 --gens graphed \
  > "$OUT/bench_c.txt" 2>&1; el "0.5b 256 x (128 + 768) rc $?"
timeout -k 5 120 $B --sizes 1.5b --gen-only --gen-shape 128x256+1024 --repeats 2 --gens graphed \
  > "$OUT/bench_d.txt" 2>&1; el "1.5b 128 x (256 + 1024) rc $?"
wait; el "done"
tail -3 "$OUT/pytest.txt"; grep " rc " "$OUT/toys.txt"; tail -1 "$OUT/precision.txt"
