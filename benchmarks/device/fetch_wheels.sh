#!/usr/bin/env bash
# Stages what benchmarks/bench_train_gpu.py needs on the device machine, which has no network:
#   .whl/           wheels of lmforge's core dependencies that its image lacks. It has python3.12,
#                   torch, transformers, numpy, safetensors, tokenizers, rich, typer, pyyaml,
#                   xxhash, jinja2, matplotlib, tensorboard; of lmforge's core dependencies it lacks
#                   pydantic (+ pydantic-core, annotated-types, typing-inspection), zstandard, ftfy
#                   and langid, and only pydantic is imported on the training path
#                   (lmforge.config / lmforge.train.config).
#   .bench/nanogpt/ nanoGPT's model.py (never committed here) and the commit it came from.
# Both are ignored by git and travel with the device call's `carry: [".whl", ".bench"]`; see
# docs/benchmarks.md, "GPU training step", for the command that uses them.
#
# Usage: benchmarks/device/fetch_wheels.sh NANOGPT   (a nanoGPT git dir or mirror, or a directory
#        holding nanoGPT's model.py)
set -euo pipefail
nanogpt="${1:?usage: $0 NANOGPT (nanoGPT git dir / mirror, or a directory with its model.py)}"
cd "$(git rev-parse --show-toplevel)"
PYTHON="${PYTHON:-python3}"
# The versions this repository's .venv runs; pydantic pins pydantic-core exactly, and both need
# typing-extensions>=4.16, newer than the image may hold (it shadows the image's on PYTHONPATH).
WHEELS=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0)

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
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"

mkdir -p .bench/nanogpt
if [ -f "$nanogpt/model.py" ]; then
  cp "$nanogpt/model.py" .bench/nanogpt/model.py
  echo "copied from $nanogpt" >.bench/nanogpt/SOURCE
else
  git --git-dir "$nanogpt" show HEAD:model.py >.bench/nanogpt/model.py
  git --git-dir "$nanogpt" rev-parse HEAD >.bench/nanogpt/SOURCE
fi

ls -l .whl .bench/nanogpt
du -sh .whl .bench
