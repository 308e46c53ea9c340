#!/usr/bin/env bash
# Prepares what the tests and the ONNX Runtime engine need, from the package registries only:
#   .venv/  Python with the pinned onnx, onnxruntime, numpy, pytest and maturin
#           (scripts/requirements-test.txt)
#   .ort/   libonnxruntime.so taken out of the PyPI `onnxruntime` wheel (ort loads it at run time)
#   .venv-triton/  the Triton serving test's tools (scripts/setup_triton.sh)
# Safe to run again: it does nothing when all are already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.32.0

# (Re)installs when a module the tests import is missing or the pinned list changed since.
stamp=.venv/.requirements-test.sha256
wanted=$(sha256sum scripts/requirements-test.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] \
  || ! .venv/bin/python -c "import onnx, onnxruntime, numpy, pytest, maturin" 2>/dev/null \
  || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
  echo "$wanted" > "$stamp"
fi

if [ ! -f .ort/libonnxruntime.so ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "onnxruntime==${ORT_VERSION}" -d "$tmp"
  mkdir -p .ort
  .venv/bin/python - "$tmp" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("onnxruntime-*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if "/capi/libonnxruntime.so" in n)
    pathlib.Path(".ort/libonnxruntime.so").write_bytes(z.read(name))
PY
fi
echo "ready: .venv (Python test tools) and .ort/libonnxruntime.so (ONNX Runtime ${ORT_VERSION})"
# The Triton Inference Server test's own venv (.venv-triton: its tritonserver and client).
scripts/setup_triton.sh
