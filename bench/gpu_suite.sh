#!/usr/bin/env bash
# The GPU suite in one command per lease of a GPU machine (bench/gpu_suite.py has the details):
# installs this checkout and the carried peers, runs in priority order what the committed results
# of this device lack for the code at hand, within the budget, and packs at most 8 files into --out.
#
#     bash bench/gpu_suite.sh --out DIR [--budget SECONDS] [--fresh] [PART ...]   # default budget 520 s
#     python bench/gpu_suite.py unpack DIR      # then: DIR -> bench/results/gpu_<device>/
#     python bench/gpu_suite.py decide          # the defaults the results decide
#
# The suite and every part run with one interpreter: $PYTHON when set (a venv's python, say),
# else the python3 first on PATH; its first line names it. Without a CUDA GPU it prints one line
# (which names the interpreter too) and exits with 2.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_suite.py "$@"
