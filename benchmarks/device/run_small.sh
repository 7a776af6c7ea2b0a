#!/usr/bin/env bash
# The GPU checks of the performance issue, in one command for a lent GPU machine (see benchmarks/README.md):
#   1. the `small` preset against TRL (1 and 3 images; mmpo, mmpo-cached, trl), with MFU;
#   2. where a `small` training step waits for the GPU (torch's sync detector and mmpo's counter).
# Run from the repository root with the wheels of fetch_wheels.sh in .whl/. Results go to $OUT
# (the device tool's return folder) or runs/device.
set -uo pipefail
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt" || exit 1
import importlib
import torch
for name in ("torch", "transformers", "peft", "lightning", "trl", "datasets", "pyarrow", "accelerate", "torchdata"):
    print(f"{name} {importlib.import_module(name).__version__}")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
import mmpo.module, datamodules  # noqa: F401,E401  the project imports with these versions
PY
WORK=${WORKDIR:-/tmp/mmpo-bench}
PRESET=${PRESET:-small}
python3 benchmarks/bench_dpo.py --preset "$PRESET" --images 1 3 --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" \
  --frameworks "${FRAMEWORKS:-mmpo,mmpo-cached,trl}" --workdir "$WORK" --out "$OUT/$PRESET.json" 2>&1 | tee "$OUT/bench.txt"
debug=$(python3 -c "import torch; print('--cuda-debug' if torch.cuda.is_available() else '')")
python3 benchmarks/sync_audit.py --preset "$PRESET" --images 3 $debug --workdir "$WORK" 2>&1 | tail -40 | tee "$OUT/syncs.txt"
