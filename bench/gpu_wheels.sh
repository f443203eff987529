#!/usr/bin/env bash
# Download, here (with network), the cp312 manylinux wheels that bench/gpu_check.sh installs
# on a bare GPU machine that has no network. That machine's image already has Python 3.12
# with torch, transformers, peft, accelerate, tokenizers, safetensors, httpx, pytest,
# hypothesis, psutil and prometheus-client; what the project and `transformers serve` need
# beyond them is downloaded with its dependencies, and the wheels of packages the image
# already holds are dropped again so that the image's own versions stay in charge.
#
#   bash bench/gpu_wheels.sh [DEST]      # DEST defaults to bench/.gpu-wheels (gitignored)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/.gpu-wheels}
python=${PYTHON:-python3}

# The project's llm and server extras (llguidance and jsonschema for output constraints),
# its test plugin, and what `transformers serve` checks for (pydantic, fastapi, uvicorn,
# openai), less what the image has. Versions are left to the resolver, for Python 3.12.
wanted=(blake3 fastapi uvicorn pydantic starlette openai watchfiles pytest-asyncio
    llguidance jsonschema)
# On the image already (its package list); a wheel of one of these would shadow it.
present=(
    accelerate annotated_doc anyio attrs certifi charset_normalizer click filelock fsspec
    h11 hf_xet httpcore httpx huggingface_hub hypothesis idna iniconfig jinja2
    markdown_it_py markupsafe mdurl numpy packaging pluggy prometheus_client psutil
    pygments pytest pytest_timeout pyyaml PyYAML regex requests rich safetensors
    shellingham sortedcontainers tokenizers torch tqdm transformers typer
    typing_extensions urllib3 uvloop
)

mkdir -p "$dest"
rm -f "$dest"/*.whl
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --dest "$dest" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "${wanted[@]}"
for name in "${present[@]}"; do
    rm -f "$dest/$name"-[0-9]*.whl
done
ls "$dest"
du -sh "$dest"
