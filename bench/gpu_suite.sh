#!/usr/bin/env bash
# The GPU suite: on a GPU machine with torch and triton preinstalled and no
# network, install klkern, run the CUDA tests and every GPU benchmark, and
# write the result files. From the repository root:
#
#     bash bench/gpu_suite.sh            # results in bench/results/gpu_<device>/
#
# Budget: under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# The QR extension JIT-builds on first CUDA use (klkern/_ext.py) when not prebuilt.
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
export KLKERN_CACHE="${KLKERN_CACHE:-/tmp/klkern_cache}"
pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3
slug=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
out="bench/results/gpu_${slug}"
mkdir -p "$out"
python - > "$out/environment.txt" <<'PY'
import datetime, platform, subprocess, torch, triton
print("device:", torch.cuda.get_device_name())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "triton:", triton.__version__, "python:", platform.python_version())
print("commit:", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
print("date:", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
try:
    import klkern._C  # noqa: F401
    print("klkern._C: built")
except Exception as err:
    print("klkern._C: not built:", err)
PY
cat "$out/environment.txt"
status=0
# 1. Correctness on CUDA: the whole suite (Triton kernels, QR extension, optimizers).
timeout 300 python -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.txt" | tail -15 || status=1
# 2. Fused-operation microbenchmarks vs eager torch.
timeout 180 python -m pytest -q -p no:cacheprovider bench/test_kernel_bench.py \
    --benchmark-json="$out/kernels.json" --benchmark-columns=median,min,max 2>&1 | tail -5 || status=1
[ -f "$out/kernels.json" ] && python bench/summarize_kernel_bench.py "$out/kernels.json" > "$out/kernels.md" && cat "$out/kernels.md"
# 3. Whole step on the GPT-2-small parameter set, GEMM floor, peak memory.
timeout 150 python bench/step_bench.py --out "$out" || status=1
# 4. Batched QR extension vs torch.linalg.qr and the householder_product route.
timeout 120 python bench/qr_bench.py --out-dir "$out" || status=1
echo "gpu_suite: results in $out (status $status)"
exit $status
