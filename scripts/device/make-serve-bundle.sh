#!/usr/bin/env bash
# The Python 3.12 / x86_64 bundle `tandem serve` needs on the GPU machine beyond the image and
# ../shared/device/make-bundles.sh's core bundle (ray + nixl): the router's HTTP stack and a
# protobuf new enough for the generated stubs, httptools (the router's HTTP parser; uvloop is in
# the image). The image's grpcio (1.84), msgpack and
# prometheus-client do, so the ~6 MB rpc bundle need not travel.
#
# usage (repo root): scripts/device/make-serve-bundle.sh [OUT_DIR]      (default: ./.whl)
# device side:  mkdir -p /tmp/site && for b in .whl/*.tar.xz; do tar -xJf $b -C /tmp/site; done
#               export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
OUT=${1:-.whl}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WORK/dl" \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 uvicorn==0.54.0 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 annotated-doc==0.0.7 \
  opentelemetry-api==1.45.2 protobuf==7.36.2 httptools==0.9.0
"$PY" -m pip install -q --no-deps --no-compile "${PLAT[@]}" --target "$WORK/site" "$WORK/dl"/*.whl
rm -rf "$WORK/site/bin"
find "$WORK/site" -name '__pycache__' -prune -exec rm -rf {} +
tar -C "$WORK/site" -cJf "$OUT/gpu_serve_py312.tar.xz" .
echo "$(du -k "$OUT/gpu_serve_py312.tar.xz" | cut -f1) KiB  $OUT/gpu_serve_py312.tar.xz"
