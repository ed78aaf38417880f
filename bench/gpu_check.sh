#!/usr/bin/env bash
# One call on a CUDA machine (written for one H200; about 13 minutes): kernel equality on CUDA, the decode
# by width, training-step throughput at the paper's shapes, the image pipeline, and the whole pipeline.
# NOT YET RUN: no session that wrote it had a GPU. Paste the output into docs/performance.md.
#
#     bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
run() { echo; echo "== $*"; timeout "${STEP_TIMEOUT:-240}" "$@" || echo "!! exit $? from: $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 1. The compiled kernels equal the torch path on CUDA (the same cases the CPU suite runs interpreted):
#    the decode, the encoder backward built on it, and a whole training step with either backend.
VITCLT_KERNEL_DEVICE=cuda run python -m pytest -p no:cacheprovider tests/test_kernels.py

# 2. Decode alone at paper shapes: equality at full size, then torch / dense / triton by code width
#    (sets DENSE_DECODE_FRACTION["cuda"] in vitclt/nn/sparse.py: the K/F where dense starts to win).
run python bench/decode_kernels.py --device cuda

# 3. Training steps at paper shapes, bf16 autocast, batch 4096 (issue 12's table): CLT with each sparsifier
#    (JumpReLU starts at k active features), the dense-decode reference, and the PLT; "syncs/step" counts the
#    host waits of one step under torch.cuda.set_sync_debug_mode (expected 0 for ReLU-TopK, 12 for the others).
run python bench/train_throughput.py --device cuda --bf16 --shape paper --batch 4096 --steps 5 --warmup 2 \
    --topology clt --sparsifier relu-topk jumprelu batch-topk --variants sparse dense-decode
run python bench/train_throughput.py --device cuda --bf16 --shape paper --batch 4096 --steps 5 --warmup 2 \
    --topology plt --sparsifier relu-topk --variants sparse

# 4. The image pipeline (issue 12 item 3; NOT YET RUN on a GPU): pinned uint8 batches equal the CPU pixels on CUDA,
#    then host decode + prepare and the end-to-end harvest into a random ViT-B/32 in bf16 with 0..16 worker
#    processes, exact and with --fast-decode (target: >= 3,000 images/s with 16 host cores).
run python -m pytest -p no:cacheprovider tests/test_image_pipeline.py
STEP_TIMEOUT=300 run python bench/image_pipeline.py --device cuda --model b32 --bf16 --parts decode harvest \
    --images 2048 --batch 256 --workers 0 8 16

# 5. The whole pipeline: random ViT-B/32, synthetic 448 px JPEGs, 5 transcoders, 100 steps of 4096 tokens
#    (harvest = the time training waited for blocks, the next block's decoding overlapping training).
STEP_TIMEOUT=360 run python bench/pipeline.py --device cuda --steps 100 --workers 12
