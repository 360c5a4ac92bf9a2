#!/usr/bin/env bash
# Download the wheels a lent GPU machine lacks (it has no network) into .whl/, for Python 3.12 on
# x86-64 Linux, as the device tool's README describes. Run here, before the device call; name .whl
# in the call's `carry`. .whl/ is kept out of git through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
# pydantic (the spec) is not on the GPU image; liger-kernel is the optional peer of the benchmarks
for package in pydantic pydantic-core annotated-types typing-inspection liger-kernel; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$package"
done
# one version of each: pydantic pins its pydantic-core exactly
ls .whl
