#!/usr/bin/env bash
# Stages what the device machine (no network) needs, in paths git ignores:
#   .whl/           wheels of lmforge's core dependencies that its image lacks. It has python3.12,
#                   torch, transformers, numpy, safetensors, tokenizers, rich, typer, pyyaml,
#                   xxhash, jinja2, matplotlib, tensorboard; of lmforge's core dependencies it lacks
#                   pydantic (+ pydantic-core, annotated-types, typing-inspection), zstandard, ftfy
#                   (+ wcwidth) and langid. Only pydantic is imported on the training path
#                   (lmforge.config / lmforge.train.config); --quickstart adds what the
#                   quickstart's data stage imports: zstandard (data/sources.py), ftfy and wcwidth
#                   (data/clean.py), langid (data/language.py; an sdist only, built here into a
#                   pure-Python wheel).
#   .bench/nanogpt/ nanoGPT's model.py (never committed here) and the commit it came from, for
#                   benchmarks/bench_train_gpu.py.
# Both travel with the device call's `carry`; docs/benchmarks.md, "GPU training step", gives the
# commands that use them (bench_train_gpu.py, and benchmarks/device/issue18_rest.sh).
#
# Usage: benchmarks/device/fetch_wheels.sh NANOGPT   (a nanoGPT git dir or mirror, or a directory
#        holding nanoGPT's model.py)
#        benchmarks/device/fetch_wheels.sh --quickstart [NANOGPT]   (also the quickstart's wheels;
#        NANOGPT is then optional)
set -euo pipefail
quickstart=0
if [ "${1:-}" = "--quickstart" ]; then
  quickstart=1
  shift
fi
if [ "$quickstart" = 1 ]; then
  nanogpt="${1:-}"
else
  nanogpt="${1:?usage: $0 [--quickstart] NANOGPT (nanoGPT git dir / mirror, or a directory with its model.py)}"
fi
cd "$(git rev-parse --show-toplevel)"
PYTHON="${PYTHON:-python3}"
# The versions this repository's .venv runs; pydantic pins pydantic-core exactly, and both need
# typing-extensions>=4.16, newer than the image may hold (it shadows the image's on PYTHONPATH).
WHEELS=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0)
QUICKSTART_WHEELS=(zstandard==0.25.0 ftfy==6.3.1 wcwidth==0.9.4)
QUICKSTART_SDISTS=(langid==1.1.6)

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.bench/; do
  grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
[ "$quickstart" = 1 ] && WHEELS+=("${QUICKSTART_WHEELS[@]}")
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
if [ "$quickstart" = 1 ]; then
  "$PYTHON" -m pip wheel -q --no-deps -w .whl "${QUICKSTART_SDISTS[@]}"
fi

if [ -n "$nanogpt" ]; then
  mkdir -p .bench/nanogpt
  if [ -f "$nanogpt/model.py" ]; then
    cp "$nanogpt/model.py" .bench/nanogpt/model.py
    echo "copied from $nanogpt" >.bench/nanogpt/SOURCE
  else
    git --git-dir "$nanogpt" show HEAD:model.py >.bench/nanogpt/model.py
    git --git-dir "$nanogpt" rev-parse HEAD >.bench/nanogpt/SOURCE
  fi
  ls -l .bench/nanogpt
fi

ls -l .whl
du -sh .whl
