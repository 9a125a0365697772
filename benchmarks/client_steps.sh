#!/usr/bin/env bash
# What each load-generator change moved: our Locust client at one load, built from the commits
# of issue 7 one change at a time, interleaved and repeated, against the same simulator setup
# (benchmarks/client_cost.py case). Results are appended to $OUT (JSON lines); print the table
# with:  .venv/bin/python benchmarks/client_cost.py report --json $OUT
#
#   benchmarks/client_steps.sh [CONCURRENCY] [REPEATS]
#
# Snapshots (harness/ and servers/ only; the benchmark scripts are always this checkout's):
#   s0-before     63d2424 (before issue 7's changes)
#   s1-coop-reads s0 + http_stream.py of 23c62e6 (one io-watcher wait then recv, timer per request)
#   s2-hdr-numpy  s1 + histograms.py of 23c62e6 (vectorised record_many)
#   s3-parse      23c62e6 (StreamTimer template fast path, SSEParser.payloads, chunk fast path)
#   s4-idle       49f0aba (bookkeeping when the loop is idle, plain-Python HDR counts, raw recv)
#   s5-final      67a3c9b (numpy fancy-index add of the HDR counts)
set -euo pipefail
cd "$(dirname "$0")/.."
C=${1:-256}
REPEATS=${2:-2}
OUT=${OUT:-runs/client_steps.jsonl}
SNAP=$(mktemp -d /tmp/client-steps-XXXX)
mkdir -p "$(dirname "$OUT")"

snap() {   # name commit [file-from-commit ...]
    local name=$1 commit=$2; shift 2
    mkdir -p "$SNAP/$name"
    git archive "$commit" harness servers | tar -x -C "$SNAP/$name"
    while [ $# -gt 0 ]; do
        git show "$1" > "$SNAP/$name/$2"
        shift 2
    done
}
snap s0-before 63d2424
snap s1-coop-reads 63d2424 23c62e6:harness/http_stream.py harness/http_stream.py
snap s2-hdr-numpy 63d2424 23c62e6:harness/http_stream.py harness/http_stream.py \
    23c62e6:harness/histograms.py harness/histograms.py
snap s3-parse 23c62e6
snap s4-idle 49f0aba
snap s5-final 67a3c9b

for rep in $(seq "$REPEATS"); do
    for name in s0-before s1-coop-reads s2-hdr-numpy s3-parse s4-idle s5-final; do
        .venv/bin/python benchmarks/client_cost.py case --client harness --concurrency "$C" \
            --seconds 8 --client-repo "$SNAP/$name" --label "$name" --json "$OUT" | tail -1 \
            | sed "s/^/$name /"
    done
done
rm -rf "$SNAP"
