#!/usr/bin/env bash
# Builds .whl/: the Python packages the GPU check needs that a bare GPU box (Python 3.12, torch, transformers,
# accelerate, no internet) lacks, as wheels to carry (the device tool's `carry`, or scp to a cluster login node).
#
#   bash launchers/gpu_wheels.sh            # -> .whl/*.whl (~55 MB); run where PyPI is reachable
#   # on the GPU box: bash launchers/gpu_check.sh   (installs .whl/ into /tmp/site itself)
#
# Versions are the ones CI resolves here (pyproject + torch 2.13 CPU), so the GPU runs the code CI tested.
# deepspeed, antlr4 and langdetect ship only sdists: they are built here, pure Python
# (DS_BUILD_OPS=0: its ops JIT-compile on the GPU box when used). Needs the project venv (.venv) for
# deepspeed's build, which imports torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT_DIR"
grep -qxF "/$OUT_DIR/" .git/info/exclude 2>/dev/null || echo "/$OUT_DIR/" >>.git/info/exclude

# pinned to what CI installs; the GPU image already has torch, transformers, accelerate, numpy, pandas,
# pyarrow, safetensors, tokenizers, huggingface_hub, requests, tqdm, rich, matplotlib, tensorboard, psutil,
# ninja, py-cpuinfo, msgpack, einops, xxhash, fsspec, anyio, h11, click, jinja2, pyyaml, nvidia-ml-py
PURE=(
    trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 hjson==3.1.0
    pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
    bpe-openai==0.1.4
)
BINARY=(pydantic-core==2.50.5 openai-harmony==0.0.8)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT_DIR" "${PURE[@]}" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$OUT_DIR" antlr4-python3-runtime==4.9.3 langdetect==1.0.9
[[ -n $(ls "$OUT_DIR"/deepspeed-0.19.8-*.whl 2>/dev/null) ]] ||
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT_DIR" deepspeed==0.19.8
du -sh "$OUT_DIR" >&2
ls "$OUT_DIR" >&2
