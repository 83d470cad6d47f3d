#!/usr/bin/env bash
# Run HERE (a machine with the package registries), from the repo root, before a GPU session's first
# device call: fills .whl/ (git-ignored; carried to the device with `carry: [".whl"]`) with
#   - monosemantic's own wheel, built from the working tree,
#   - the wheels of benchmarks/gpu/wheels.txt for the device's CPython 3.12 on x86-64.
# Optionally `prepare.sh OTHER_TREE...` also builds wheels of other trees (a branch's worktree, an old
# commit's) into .whl/v_<name>/ for side-by-side runs on the device (on_device.sh alt).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps . -w .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
reqs=$(grep -v -e '^#' -e '^$' benchmarks/gpu/wheels.txt | grep -v '^antlr4-python3-runtime')
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl $reqs
# antlr4 4.9.3 (hydra's pin) is published as a source archive only; it is pure Python, so a wheel built here runs there.
"$PY" -m pip wheel -q --no-deps "$(grep '^antlr4-python3-runtime' benchmarks/gpu/wheels.txt)" -w .whl
for tree in "$@"; do
    name=$(basename "$tree")
    mkdir -p ".whl/v_$name"
    "$PY" -m pip wheel -q --no-deps "$tree" -w ".whl/v_$name"
done
du -sh .whl
