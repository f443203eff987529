#!/usr/bin/env bash
# Issue #22's GPU check, in one call on a bare GPU machine with no network: install the
# project's other dependencies from carried wheels, run the CUDA tests, then the throughput
# benchmark on a ~0.94 B-parameter random bfloat16 model, hotweights against
# `transformers serve --continuous-batching`.
#
# The machine already has Python 3.12 with torch, transformers, peft and accelerate. Here,
# first (with network):  bash bench/gpu_wheels.sh   (or: make gpu-wheels)
# Then, through the device tool, from the repository root, carrying the wheels:
#   run(command="bash bench/gpu_check.sh", carry=["bench/.gpu-wheels"], timeout_s=600)
# What it measured comes back from $OUT (throughput-gpu.json/.md, the servers' log tails,
# the test log). It stays under about 9 minutes: the tests have 120 s, the benchmark 400 s
# (building the two 0.94 B checkpoints takes about a minute of it).
#
#   bash bench/gpu_check.sh [--dry-run]    # --dry-run: check the wheels, print every step
set -uo pipefail

cd "$(dirname "$0")/.."
dry=0
[[ ${1:-} == --dry-run ]] && dry=1
python=${PYTHON:-python3}
wheels=${GPU_WHEELS:-bench/.gpu-wheels}
site=${GPU_SITE:-/tmp/hotweights-gpu-site}
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
failed=0

step() {  # print a step, and run it unless this is a dry run
    echo "+ $*" >&2
    ((dry)) || "$@"
}

shopt -s nullglob
carried=("$wheels"/*.whl)
if ((${#carried[@]} == 0)); then
    echo "no wheels in $wheels: run bench/gpu_wheels.sh here first, and carry $wheels" >&2
    exit 2
fi
echo "${#carried[@]} wheels in $wheels" >&2

if ((!dry)); then
    nvidia-smi -L || true
    "$python" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' || exit 3
fi

# Installed into their own folder, first on the path: the image's packages are left as
# they are, and the wheels (gpu_wheels.sh) hold none of those.
step "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "${carried[@]}" || exit 4
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
step "$python" -c 'import hotweights.cli, fastapi, uvicorn, pydantic, openai, transformers; print("imports ok", transformers.__version__)' || exit 5

# The CUDA tests: the `cuda` marker once pyproject declares one, else every test in the
# files that mention CUDA (a GPU test need not say so in its name, e.g.
# test_on_a_gpu_the_engine_answers_as_the_loop; the CPU tests beside it are quick). Only
# those files, so that tests needing what the image lacks (Ray, schemathesis) are not
# even collected.
mapfile -t files < <(grep -rl --include='test_*.py' -i cuda tests | sort)
if grep -q '^ *"cuda:' pyproject.toml; then select=(-m cuda); else select=(); fi
if ((${#files[@]})); then
    step timeout 120 "$python" -m pytest -p no:cacheprovider -q -rs "${select[@]}" "${files[@]}" \
        2>&1 | tee "$out/cuda-tests.log" || failed=1
else
    echo "no test file mentions cuda" >&2
fi

# The benchmark. The transformers CLI is the image's own: nothing can be installed.
cli=$(dirname "$(command -v "$python")")/transformers
[[ -x $cli ]] || cli=$(command -v transformers || echo transformers)
step timeout 400 "$python" bench/throughput.py --model 1b --device cuda --dtype bfloat16 \
    --peers transformers-cb --transformers-cli "$cli" --concurrency 1 8 32 --tokens 64 \
    --min-requests 16 --reloads 3 --steady 5 --quiet-wait 0 --out "$out/throughput-gpu.json" \
    || failed=1

if ((!dry)); then
    for log in hotweights transformers-cb; do
        tail -n 200 "$HOME/.cache/hotweights/throughput/$log.log" >"$out/$log.log.txt" 2>/dev/null
    done
fi
exit $failed
