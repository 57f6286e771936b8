#!/usr/bin/env bash
# Fills .whl/ with the wheels that bench/gpu.sh installs on a GPU machine that has no package index:
# mlflow (the version in .venv; `bench train` times MLflow's per-epoch logging) and those of its
# dependencies that the machine's image lacks (bench/gpu_image_packages.txt). Run it here, where PyPI
# is reachable; the machine's Python is 3.12 on x86-64. About 37 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(.venv/bin/python -c "import mlflow; print(mlflow.__version__)")
normalise() { tr 'A-Z_.' 'a-z--'; }
present=$(grep -v '^#' bench/gpu_image_packages.txt | normalise)
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$download" "mlflow==$version"
rm -rf .whl && mkdir .whl
for wheel in "$download"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | normalise)
  grep -qx "$name" <<< "$present" || cp "$wheel" .whl/
done
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), in .whl/ (mlflow $version)"
