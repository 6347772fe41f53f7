#!/usr/bin/env bash
# Everything that waits for a GPU, in parts that each fit one call of the device tool (<= 10 min).
#
# Run from the repository root on the GPU machine (its image has torch + CUDA, numpy, tqdm,
# pytest, matplotlib; nothing can be downloaded there). hypergrad is used from the source tree
# (PYTHONPATH), not installed. The peers (torchopt, higher) travel as wheels: once, here,
# `make gpu-wheels` fills ./.whl (git-ignored); name `.whl` in the device call's `carry`.
#
#   benchmarks/gpu.sh tests      # the CUDA tests (tests marked `gpu`), ~1-2 min
#   benchmarks/gpu.sh suite      # run.py --full: mlp, cnn, resnet18 with peers, fp32
#   benchmarks/gpu.sh gpt        # run.py --full: the ~100M GPT, fp32 (does it fit, its ratios)
#   benchmarks/gpu.sh bf16       # run.py --full --autocast bf16: resnet18 and gpt
#   benchmarks/gpu.sh fits       # fits.py: GPT per-sequence memory, ResNet-18 Unrolled / higher memory
#   benchmarks/gpu.sh stn        # selftuning.py --device cuda (issue 6's time ratio on a GPU)
#
# Results go to $OUT (the device tool's return folder; at most 8 files come back) or to the
# folder given as the second argument; copy the JSONs into benchmarks/results/ here and
# regenerate the tables with `.venv/bin/python benchmarks/report.py benchmarks/results/suite-*.json
# > benchmarks/RESULTS.md`.
set -euo pipefail
part=${1:?"usage: benchmarks/gpu.sh tests|suite|gpt|bf16|fits|stn [out-dir]"}
cd "$(dirname "$0")/.."
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hg-site .whl/*.whl
    export PYTHONPATH=/tmp/hg-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
$PY -c "import torch, hypergrad; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), 'hypergrad', hypergrad.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

case $part in
tests)
    # -p no:cacheprovider: the tree may be read-only; -rs lists what skipped and why
    $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.log"
    ;;
suite)
    $PY benchmarks/run.py --device cuda --full --models mlp,cnn,resnet18 --budget 120 \
        --out "$out/suite-gpu-full.json" --md "$out/suite-gpu-full.md" 2>&1 | tee "$out/suite.log"
    ;;
gpt)
    $PY benchmarks/run.py --device cuda --full --models gpt --no-peers --budget 120 \
        --out "$out/suite-gpu-full-gpt.json" --md "$out/suite-gpu-full-gpt.md" 2>&1 | tee "$out/gpt.log"
    ;;
bf16)
    $PY benchmarks/run.py --device cuda --full --models resnet18,gpt --autocast bf16 --no-peers --budget 90 \
        --out "$out/suite-gpu-full-bf16.json" --md "$out/suite-gpu-full-bf16.md" 2>&1 | tee "$out/bf16.log"
    ;;
fits)
    $PY benchmarks/fits.py --device cuda --batch 8,32 --out "$out/fits-gpt-gpu.json" 2>&1 | tee "$out/fits.log"
    $PY benchmarks/fits.py --device cuda --model resnet18 --batch 128 \
        --methods unrolled-5,unrolled-5-ckpt,higher-5,neumann-5 --out "$out/fits-resnet18-gpu.json" 2>&1 | tee -a "$out/fits.log"
    ;;
stn)
    $PY benchmarks/selftuning.py --device cuda --out "$out/selftuning-gpu.json" 2>&1 | tee "$out/stn.log"
    ;;
*)
    echo "unknown part: $part (tests|suite|gpt|bf16|fits|stn)" >&2
    exit 2
    ;;
esac
