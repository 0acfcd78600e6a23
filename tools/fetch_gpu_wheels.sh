#!/usr/bin/env bash
# Download the wheels tools/gpu_check.sh installs on our GPU test machine into .whl/ (gitignored).
#   bash tools/fetch_gpu_wheels.sh
# That machine has Python 3.12 on x86-64 with torch, triton, transformers, numpy, pyarrow, pyyaml,
# safetensors, tokenizers, psutil, tensorboard and pytest preinstalled (see the device notes),
# and no internet. What the project needs beyond that: megatron-core (pinned like setup.py) and
# math-verify with its parsers (the RL math reward). Versions are the ones our CPU tests use.
# Everything that travels with the tree must stay under 64 MiB; these are about 3 MB.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls -l .whl
n=$(find .whl -type f -name '*.whl' | wc -l)
if [ "$n" -ne "${#WHEELS[@]}" ]; then
  echo "fetch_gpu_wheels: expected ${#WHEELS[@]} wheels, got $n (one version of each)" >&2
  exit 1
fi
echo "fetch_gpu_wheels: $(du -sh .whl | cut -f1) in .whl/"
