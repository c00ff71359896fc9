#!/usr/bin/env bash
# The artefact users install, tested the way they install it: build sdist + wheel, check their metadata, install the
# wheel (no editable install, no dev extras) into a fresh virtual environment outside the checkout, and run pld from
# a folder outside the checkout: --version, the quick demo, and a tiny make-shards -> distill (teacher) ->
# cache-teacher -> inspect -> verify -> distill (pld) chain. Called by .ci/run after the tests; runs alone too:
#     bash .ci/wheel_check.sh            (uses python3 from PATH, which needs `build` and `twine`: the dev extra)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/pld-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
step() { printf '[wheel-check %4ds] %s\n' $((SECONDS - t0)) "$*"; }

step "build sdist + wheel from a copy of the tracked files"
mkdir -p "$work/src" && (cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/src")
python3 -m build --outdir "$work/dist" "$work/src" > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
python3 -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
step "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB, $(python3 -m zipfile -l "$wheel" | tail -n +2 | wc -l) files"

step "fresh virtual environment, pip install the wheel (its declared dependencies only)"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$wheel"
export PATH="$work/venv/bin:$PATH"
cd "$work" && mkdir run && cd run   # outside the checkout: nothing of it is importable from here
python - "$repo" <<'PY'
import sys, pld_pipeline, pld_pipeline_cli, pld_pipeline.cache
repo = sys.argv[1]
for m in (pld_pipeline, pld_pipeline_cli, pld_pipeline.cache):
    assert "site-packages" in m.__file__ and not m.__file__.startswith(repo), f"{m.__name__} from {m.__file__}"
print("imports from", pld_pipeline.__file__)
PY
want=$(python -c 'import importlib.metadata as m; print("pld-pipeline", m.version("pld-pipeline"))')
got=$(pld --version)
[ "$got" = "$want" ] || { echo "pld --version printed '$got', the installed wheel is '$want'"; exit 1; }
step "pld --version: $got"

step "pld demo --quick"
pld demo --quick --quiet --device cpu --out demo > demo.log 2>&1 || { tail -30 demo.log; exit 1; }
test -s demo/results.md

step "make-shards -> distill (teacher) -> cache-teacher -> inspect -> verify -> distill (pld)"
pld make-shards digits --out shards --shard-size 400 > /dev/null
train="shards/train-{000000..000003}.tar"
pld distill --loss ce --data "$train" --val-data shards/val-000000.tar --student cifar_resnet8 --size 16 --pad 2 --epochs 1 \
    --batch-size 64 --workers 0 --device cpu --out runs/teacher > teacher.log 2>&1 || { tail -20 teacher.log; exit 1; }
pld cache-teacher --data "$train" --teacher cifar_resnet8 --teacher-checkpoint runs/teacher/best.safetensors \
    --size 16 --pad 2 --views 2 --top-k 5 --workers 0 --device cpu --out cache.zarr > cache.log 2>&1 || { tail -20 cache.log; exit 1; }
pld inspect cache.zarr > /dev/null
pld verify cache.zarr
pld distill --cache cache.zarr --data "$train" --val-data shards/val-000000.tar --student cifar_resnet8 --loss pld \
    --epochs 1 --batch-size 64 --workers 0 --device cpu --out runs/pld > pld.log 2>&1 || { tail -20 pld.log; exit 1; }
test -s runs/pld/summary.json
step "ok: the installed wheel runs the quick demo and the cache -> distill chain"
