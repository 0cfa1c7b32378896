#!/usr/bin/env bash
# The wheels a lent GPU machine (Python 3.12, a CUDA torch, no network, no DeepSpeed) needs to run
# scripts/gpu_check.py, into gpu_wheels/ (ignored by git; carried with the tree, about 14 MB):
#   bash scripts/gpu_wheels.sh                                   # here, with network, after scripts/setup.sh
#   pip install --no-index --no-deps --target /tmp/site gpu_wheels/*.whl &&
#     PYTHONPATH=/tmp/site:. python scripts/gpu_check.py --out $OUT/gpu_check.json   # there
# Versions are requirements.txt's and DeepSpeed's requirements as installed here. DeepSpeed's wheel is built from
# its sdist without ops (they are JIT-built where needed; on a GPU Switchyard needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
python="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p gpu_wheels
pins=$(pip freeze | grep -iE '^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions|hjson|msgpack|py-cpuinfo|einops|sentencepiece|sacrebleu|fire|tqdm|psutil|portalocker|colorama|tabulate|lxml|regex)==')
# shellcheck disable=SC2086
pip download --quiet --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d gpu_wheels $pins
pip download --quiet --no-deps --no-binary=:all: "deepspeed==$(pip show deepspeed | sed -n 's/^Version: //p')" -d /tmp/deepspeed_sdist
DS_BUILD_OPS=0 pip wheel --quiet --no-deps --no-build-isolation /tmp/deepspeed_sdist/deepspeed-*.tar.gz -w gpu_wheels
ls gpu_wheels
