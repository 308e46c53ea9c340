#!/usr/bin/env bash
# Fuzzes every target in fuzz/ (cargo-fuzz, nightly) for RUNS executions each, seeded with every
# fixture, then minimises each target's corpus and packs it into fuzz/corpus/TARGET.tar.zst
# (committed; CI replays it in passes/tests/fuzz_corpus.rs). Each target's figures go to
# fuzz/stats/TARGET.txt. A rerun starts from the committed corpus.
#
#   scripts/fuzz.sh [RUNS] [TARGET ...]      (default: 1000000 runs, every target)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(load ir printer discovery rewrites)
seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT
cp models/fixtures/*.onnx models/fixtures/negative/*.onnx passes/tests/data/*.onnx fuzz/seeds/*.onnx "$seeds/"
mkdir -p fuzz/stats
cd fuzz
for target in "${targets[@]}"; do
  if [ ! -d "corpus/$target" ] && [ -f "corpus/$target.tar.zst" ]; then
    zstd -d -q -c "corpus/$target.tar.zst" | tar -C corpus -xf -
  fi
  mkdir -p "corpus/$target"
  start=$(date +%s)
  # 64 KiB holds every seed that runs the passes (fuzz/seeds/tiny_dit.onnx); larger fixtures
  # are read truncated, which still exercises the decoder's error paths.
  cargo +nightly fuzz run "$target" "corpus/$target" "$seeds" -- \
    -runs="$runs" -max_len=65536 -rss_limit_mb=3000 -timeout=20 -print_final_stats=1 \
    > "stats/$target.log" 2>&1
  end=$(date +%s)
  cargo +nightly fuzz cmin "$target" "corpus/$target" -- -max_len=65536 -rss_limit_mb=3000 \
    >> "stats/$target.log" 2>&1
  tar -C corpus -cf - "$target" | zstd -19 -q -f -o "corpus/$target.tar.zst"
  {
    echo "target $target: $(grep -m1 'stat::number_of_executed_units' "stats/$target.log" | awk '{print $2}') executions in $((end - start)) s"
    grep -E 'stat::(average_exec_per_sec|peak_rss_mb|slowest_unit_time_sec)' "stats/$target.log"
    echo "corpus after cmin: $(ls "corpus/$target" | wc -l) files, $(du -sk "corpus/$target" | cut -f1) KiB, packed $(du -k "corpus/$target.tar.zst" | cut -f1) KiB"
  } > "stats/$target.txt"
  cat "stats/$target.txt"
done
