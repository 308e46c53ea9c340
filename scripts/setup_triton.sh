#!/usr/bin/env bash
# Prepares what the Triton Inference Server test (python/tests/test_triton.py) needs, from PyPI:
#   .venv-triton/  Python with nvidia-pytriton 0.7.0 (its `tritonserver` binary and Python-backend
#                  stubs), tritonclient, protobuf, numpy, onnxruntime and pytest, pinned in
#                  scripts/requirements-triton.txt. Its own venv: pytriton's numpy < 2 conflicts
#                  with .venv's numpy==2.4.6.
# The test finds it at .venv-triton/ (or where FASTCACHE_TRITON_VENV points).
# Safe to run again: it does nothing when the pinned set is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTCACHE_TRITON_VENV:-.venv-triton}
REQ=scripts/requirements-triton.txt
STAMP="$VENV/.requirements-triton.txt"

if [ -x "$VENV/bin/python" ] && cmp -s "$REQ" "$STAMP" \
  && "$VENV/bin/python" -c "import tritonclient.grpc.model_config_pb2, onnxruntime, numpy, pytest" 2>/dev/null; then
  echo "ready: $VENV (Triton test tools, unchanged)"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
server=$("$VENV/bin/python" -c "import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver/bin/tritonserver')")
[ -x "$server" ] || { echo "nvidia-pytriton installed but $server is missing" >&2; exit 1; }
cp "$REQ" "$STAMP"
echo "ready: $VENV (tritonserver at $server)"
