#!/usr/bin/env bash
# One short GPU session for the TT-speed work: build check, the CUDA tests, the GPU lookup and DLRM
# figures. Run from the repository root on a CUDA machine; everything lands in ${OUT:-gpu_out}/.
#   bash bench/gpu_check.sh            (about 5-8 minutes on one H100/H200)
# Uses .venv if it exists, else `make install RANKSEARCH_DEVICE=cuda` (needs the package index), else
# the python3 on PATH if it already has torch with CUDA.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if [ ! -x .venv/bin/python ]; then
  make install RANKSEARCH_DEVICE=cuda >"$OUT/install.log" 2>&1 || log "make install failed (see install.log)"
fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count())
PY
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

log "tests: fused lookup, layers (CUDA cases), table optimizers, DLRM"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_tt_lookup.py tests/test_table_optim.py \
  "tests/test_tensorized_layers.py" -k "cuda or fused or gradcheck_embedding" >"$OUT/tests_layers.txt" 2>&1
tail -3 "$OUT/tests_layers.txt" | tee -a "$OUT/summary.txt"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_dlrm.py -k "not raw_criteo" >"$OUT/tests_dlrm.txt" 2>&1
tail -3 "$OUT/tests_dlrm.txt" | tee -a "$OUT/summary.txt"

log "GPU lookup benchmark: TT vs nn.EmbeddingBag(sparse=True)+SGD, 10^6 x 128, rank 16, batch 8192"
timeout 240 $PY -m bench.tables --device cuda --json "$OUT/tables_cuda.json" >"$OUT/tables_cuda.md" 2>"$OUT/tables_cuda.err"
cat "$OUT/tables_cuda.md" | tee -a "$OUT/summary.txt"

if [ "$GPUS" -ge 2 ]; then
  log "2-GPU nccl sharded test"
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_sharding.py >"$OUT/tests_sharding.txt" 2>&1
  tail -3 "$OUT/tests_sharding.txt" | tee -a "$OUT/summary.txt"
else
  log "one GPU: single-GPU DLRM training run"
  timeout 240 $PY -m ranksearch.orchestrator.cli train --model dlrm --dataset synthetic-criteo --method fixed \
    --format ttm --budget 0.01 --epochs 1 --max-train 20000 --model-option embedding_dim=16 --device cuda \
    --json "$OUT/dlrm_cuda.json" --quiet >"$OUT/dlrm_cuda.txt" 2>&1
  tail -5 "$OUT/dlrm_cuda.txt" | tee -a "$OUT/summary.txt"
fi
log "done"
