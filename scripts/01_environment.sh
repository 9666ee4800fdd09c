#!/usr/bin/env bash
# 01: the Python environment: captionjax and its dependencies in a virtual env
# (.venv), then JAX's CUDA 12 build at the same JAX version, checked on the GPU.
#
#   bash scripts/01_environment.sh [--dry_run]
#
# Needs Python 3.10+, an NVIDIA driver for CUDA 12 (`nvidia-smi` works), and
# Java 17 for METEOR (`sudo apt-get install openjdk-17-jre-headless`).
# Re-running it is harmless: pip skips what is installed. --dry_run installs
# nothing: it checks that the current Python imports captionjax and JAX.
. "$(dirname "$0")/common.sh"

if [ "$DRY_RUN" = 1 ]; then
  "$PYTHON" -c "import captionjax, jax; print('captionjax', captionjax.__file__, '| jax', jax.__version__, jax.devices())"
  say "dry run: nothing installed (the GPU run installs jax[cuda12] here)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
PYTHON="$VENV/bin/python"
"$PYTHON" -m pip install --upgrade pip
"$PYTHON" -m pip install -e "$REPO[dev]"
# The CUDA 12 plugin and its CUDA libraries (cuDNN, cuBLAS, NCCL) from PyPI, for the JAX
# version requirements.txt resolved to.
JAX_VERSION="$("$PYTHON" -c 'import jax; print(jax.__version__)')"
"$PYTHON" -m pip install "jax[cuda12]==$JAX_VERSION"
"$PYTHON" - <<'PY'
import jax
devices = jax.devices()
print("jax", jax.__version__, devices)
if devices[0].platform != "gpu":
  raise SystemExit("no GPU visible to JAX: check `nvidia-smi` and the CUDA 12 driver")
PY
command -v java >/dev/null || say "note: no java on PATH: METEOR will be left out of the scores"
say "environment ready: $VENV"
