#!/usr/bin/env bash
# benchmarks/gpu_check.sh is what the first lent GPU runs; its --tiny mode runs the same steps on CPU in about a
# minute, so CI keeps the script working while no GPU is lent. A script check (it starts ~8 interpreters), not a
# unit test: it runs after the README's test command, not inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d /tmp/pld-gpu-check.XXXXXX)
if ! PYTHON=${PYTHON:-python3} bash benchmarks/gpu_check.sh "$out" --tiny > "$out/stdout.log" 2>&1; then
    tail -60 "$out/stdout.log"
    echo "gpu-check: benchmarks/gpu_check.sh --tiny failed (log: $out/stdout.log)"
    exit 1
fi
"${PYTHON:-python3}" - "$out/gpu_check.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
steps = {"cuda tests", "cache-teacher vs bare forward", "cache for distill", "distill pld from cache",
         "distill ce without cache"}
assert r["ok"] and r["tiny"] and set(r["steps"]) == steps, r
assert r["cache_teacher_over_bare_forward"] > 0 and r["distill_from_cache_over_ce"] > 0, r
print("gpu-check: ok (tiny, CPU):", {k: v["seconds"] for k, v in r["steps"].items()})
PY
rm -rf "$out"
