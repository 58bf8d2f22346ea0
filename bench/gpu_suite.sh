#!/usr/bin/env bash
# The GPU suite: on a GPU machine with torch and triton preinstalled and no
# network, install klkern and run, in order, each part writing its results
# under bench/results/gpu_<device>/ as soon as it ends and going on when a
# part fails or times out:
#
#   check    python -m klkern.check: every path against klkern.reference
#   tests    the test suite on CUDA
#   compile  every recorded Triton variant compiled for sm_80/sm_90 with this
#            machine's triton (registers, spills, shared memory, mma/wgmma)
#   step     whole-step benchmark, torch vs Triton at each matmul precision,
#            TFLOP/s against the device's peak, peak memory,
#            precondition_frequency=1
#   kernels  fused-operation microbenchmarks vs eager torch, each precision
#   qr       the four batched-QR methods
#
# From the repository root:
#
#     bash bench/gpu_suite.sh                 # every part (about 15-20 minutes on an H100)
#     bash bench/gpu_suite.sh check tests     # some parts, in the order given
#
# The per-part time limits add up to 19 minutes; the time each part took is
# printed and written to suite.txt. Without a CUDA GPU it exits at once.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: no CUDA GPU here (torch.cuda.is_available() is False): this suite is for a GPU machine"
    exit 2
fi

ALL_PARTS=(check tests compile step kernels qr)
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=("${ALL_PARTS[@]}")
for part in "${PARTS[@]}"; do
    case " ${ALL_PARTS[*]} " in *" $part "*) ;; *) echo "gpu_suite: unknown part '$part' (parts: ${ALL_PARTS[*]})"; exit 2;; esac
done

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# The QR extension JIT-builds on first CUDA use (klkern/_ext.py) when not prebuilt.
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
export KLKERN_CACHE="${KLKERN_CACHE:-/tmp/klkern_cache}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONUNBUFFERED=1
if ! python -c "import klkern" 2>/dev/null; then
    pip install --no-deps --no-build-isolation -e . 2>&1 | tail -2
fi
slug=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
out="bench/results/gpu_${slug}"
mkdir -p "$out"
python - > "$out/environment.txt" <<'PY'
import datetime, platform, subprocess, torch, triton
print("device:", torch.cuda.get_device_name(), "capability:", torch.cuda.get_device_capability())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "triton:", triton.__version__, "python:", platform.python_version())
print("commit:", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown")
print("date:", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
PY
cat "$out/environment.txt"

declare -A LIMIT=([check]=90 [tests]=330 [compile]=120 [step]=270 [kernels]=210 [qr]=120)
summary="$out/suite.txt"
echo "# gpu_suite parts: status and seconds ($(date -u '+%Y-%m-%d %H:%M UTC'))" >> "$summary"
failed=0

run_part() {  # run_part NAME: the part's commands, their output in $out/NAME.log
    local name=$1 start=$SECONDS status
    echo "=== $name (limit ${LIMIT[$name]} s)"
    case $name in
        check)
            timeout "${LIMIT[$name]}" python -m klkern.check --json "$out/check.json" ;;
        tests)
            timeout "${LIMIT[$name]}" python -m pytest -q -p no:cacheprovider tests -x --maxfail=20 ;;
        compile)
            TRITON_INTERPRET=1 timeout 60 python -m klkern.triton_kernels.compile_check record "$out/variants.json" &&
            timeout $(( ${LIMIT[$name]} - 30 )) python -m klkern.triton_kernels.compile_check compile \
                "$out/variants.json" --arch 80,90 --out "$out/compile.json" --md "$out/compile.md" ;;
        step)
            timeout "${LIMIT[$name]}" python bench/step_bench.py --out "$out" ;;
        kernels)
            timeout "${LIMIT[$name]}" python -m pytest -q -p no:cacheprovider bench/test_kernel_bench.py \
                --benchmark-json="$out/kernels.json" --benchmark-columns=median,min,max &&
            python bench/summarize_kernel_bench.py "$out/kernels.json" > "$out/kernels.md" ;;
        qr)
            timeout "${LIMIT[$name]}" python bench/qr_bench.py --out-dir "$out" ;;
    esac > "$out/$name.log" 2>&1
    status=$?
    tail -25 "$out/$name.log"
    local took=$(( SECONDS - start ))
    echo "$name: status $status, $took s" | tee -a "$summary"
    [ $status -ne 0 ] && failed=1
    return 0
}

for part in "${PARTS[@]}"; do
    run_part "$part"
done
echo "gpu_suite: results in $out; total $SECONDS s; $( [ $failed -eq 0 ] && echo 'all parts passed' || echo 'some parts FAILED (see suite.txt)')"
exit $failed
