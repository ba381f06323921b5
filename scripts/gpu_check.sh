#!/usr/bin/env bash
# hfcompress's GPU check (issue 18): one script, about 5 minutes on one H200. The Python is scripts/gpu_check.py.
#
# The exact device-tool call (the wheels in .whl/ must be in the repo root first, see below):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480)
# It writes $OUT/gpu_check.md, $OUT/gpu_check.json, $OUT/gpu_check.log (and pip_install.log); commit the .md and
# .json under scripts/bench/results/ (e.g. gpu_check-h200.md/.json).
#
# .whl/ holds the Python 3.12 manylinux wheels of what the GPU image lacks (compressed-tensors and its pydantic,
# loguru; greenlet; datasets, dill, multiprocess; bitsandbytes; typing-extensions), ~46 MiB, ignored by git:
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl compressed-tensors==0.20.1 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 loguru==0.7.3 greenlet==3.5.6 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2
# Without them the script still runs; the steps that need a missing package record its import error.
#
# Dry run on a CPU (tiny sizes, what the CPU tests exercise): bash scripts/gpu_check.sh --dry-run
# (or HFCOMPRESS_GPU_CHECK_DRY=1). Any other arguments go to gpu_check.py (e.g. --steps env,model,gptq,runtime).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
case "${HFCOMPRESS_GPU_CHECK_DRY:-}" in ""|0) ;; *) dry=1 ;; esac

status="no .whl folder: nothing installed"
if [ "$dry" = 1 ]; then
    status="dry run: wheels not installed (they are for the GPU machine's Python 3.12)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G ".whl/*.whl" > /dev/null; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl > "$OUT/pip_install.log" 2>&1; then
        status="installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    else
        status="pip install failed (see pip_install.log): $(tail -n 1 "$OUT/pip_install.log")"
    fi
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export GPU_CHECK_INSTALL_STATUS="$status"
echo "[gpu_check.sh] $status"

"$PYTHON" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
