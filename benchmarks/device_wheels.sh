#!/usr/bin/env bash
# The Python packages that benchmarks/device_check.py needs and the GPU machines' image lacks, as wheels
# for its Python 3.12 on x86-64, into .whl/ (ignored by git), to carry there (docs/scaling.md).
# The image has torch, accelerate, transformers, einops, pandas, pillow, safetensors, scikit-image,
# tifffile and matplotlib; these are the rest of what the training path imports.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest .whl blake3 webdataset==1.0.2 braceexpand hjson pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types typing-inspection "typing-extensions>=4.16"
# DeepSpeed ships as source; its wheel is pure Python and builds here in seconds.
python3 -m pip wheel --quiet --no-deps --wheel-dir .whl deepspeed==0.19.8
ls .whl
