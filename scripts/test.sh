#!/usr/bin/env bash
# Runs every test of the project: prepares the pinned Python test tools and the ONNX Runtime
# library (scripts/setup.sh), then the whole Rust workspace's tests, then the Python package's.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so}"
export FASTCACHE_TEST_PYTHON="${FASTCACHE_TEST_PYTHON:-$PWD/.venv/bin/python}"
cargo test --workspace --locked "$@"
# The Python package (python/): builds the wheel with maturin, installs it into a fresh venv and
# checks it against the binary the line above built.
.venv/bin/python -m pytest python/tests -q
