#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12 with torch, torchvision, timm, numpy, pillow,
# safetensors and pytest, but not this project's other dependencies, and no package index.
# Writes them to .whl/ (git ignores it), at the versions this checkout's dev venv tests with, for
# CPython 3.12 on x86-64 Linux. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# then run benchmarks/gpu_suite.py (its docstring has the whole command).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
[ -x .venv/bin/python ] || { echo "no .venv: run 'source scripts/env.sh dev' first" >&2; exit 1; }

# The store, configuration and the service stack; everything else is on the GPU image.
packages=(zarr numcodecs donfig google-crc32c crc32c
          pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
          celery kombu redis amqp billiard vine click-didyoumean click-plugins click-repl
          prompt-toolkit wcwidth tzdata fastapi starlette uvicorn python-multipart)
pins=()
for name in "${packages[@]}"; do
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    [ -n "$version" ] && pins+=("$name==$version")
done

rm -rf "$out" && mkdir -p "$out"
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
           manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
for pin in "${pins[@]}"; do  # one at a time: a failure names the package
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$out" "$pin" 2> >(grep -v "^WARNING: Location" >&2) \
        || { echo "no CPython 3.12 x86-64 wheel for $pin" >&2; exit 1; }
done
echo "$(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1), in $out:" >&2
ls "$out" >&2
