#!/usr/bin/env bash
# The one command for a GPU machine: bash benchmarks/device_run.sh [--budget SECONDS] [--out DIR] [--dry-run] [...]
#
# Works on a bare machine that has its own CUDA PyTorch (and numpy, safetensors, opencv, matplotlib,
# typer, rich, tqdm, pyyaml, tensorboard, torchmetrics, as the usual CUDA images do): the project runs
# from src/ with the machine's torch; wheels found in .whl/ (or $WHEELS) for anything else it lacks are
# installed with --no-deps into /tmp/site first. Prepared 256x256 caches of the datasets are read from
# .devdata/ (`--fetch-data` makes them from ../shared/data: JPEG q95, 35 MB) or --data-root. Everything else
# (--budget, --out, --dry-run, --jobs, --max-workers) goes to benchmarks/device_run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

if [[ "${1:-}" == "--fetch-data" ]]; then
  # caches of both datasets: 256x256 at JPEG q95 (35 MB) for the paper's jobs, or (`--fetch-data SRC 352`)
  # 352x352 at q85 (31 MB) for the strong recipe's, whose augmentation needs kornia, which the GPU image lacks:
  # its wheels (7 MB, Python 3.12) go to $WHEELS. The exact lossless caches (88 MB at 256) do not fit a 64 MiB
  # transfer beside the repository (23 MB); evaluation of what comes back is redone on the source files
  SRC=${2:-../shared/data}
  SIZE=${3:-256}
  Q=$([[ "$SIZE" == 256 ]] && echo 95 || echo 85)
  resunetpp data prepare "$SRC/Kvasir-SEG" --size "$SIZE" --quality "$Q" --out ".devdata/kvasir-seg-$SIZE"
  resunetpp data prepare "$SRC/CVC-ClinicDB" --size "$SIZE" --quality "$Q" --out ".devdata/cvc-clinicdb-$SIZE"
  if [[ "$SIZE" != 256 ]]; then
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" kornia==0.9.0 kornia-rs==0.2.0
  fi
  exit 0
fi

if [[ " $* " != *" --dry-run "* ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import resunetpp.training.reproduce, torch; print('resunetpp from src/, torch', torch.__version__)"
exec $PY benchmarks/device_run.py "$@"
