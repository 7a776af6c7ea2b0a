#!/usr/bin/env bash
# Download, on a machine with the package index, the wheels that the GPU machine lacks (or holds in
# other versions) for benchmarks/device/run_small.sh: Python 3.12, x86-64 Linux, no dependencies
# resolved (the machine has torch, transformers, numpy, pandas, pillow, safetensors and tokenizers).
# Writes to .whl/ (git-ignored). Versions are those the CPU benchmark runs with, but for datasets and
# pyarrow (TRL reads its data through them), older ones whose wheels fit the 64 MiB a run carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
  lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0 peft==0.21.2 accelerate==1.15.0
  trl==1.16.0 datasets==4.7.0 pyarrow==21.0.0 dill==0.4.0 multiprocess==0.70.18 xxhash==4.1.0
  fsspec==2026.2.0 einops==0.8.2 torchdata==0.11.0 jsonargparse==4.53.0
)
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
du -ch .whl/*.whl | tail -1
