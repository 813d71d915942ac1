#!/usr/bin/env bash
# Builds what a release publishes into dist/: an abi3 wheel (CPython >= 3.10) with a manylinux
# tag for an old glibc baseline, linked by maturin with zig (PyPI's `ziglang`, so no system
# toolchain for the target is needed), and the sdist.
#
#   bash scripts/build-wheels.sh [--compatibility manylinux2014]
#
# Tools go into their own virtual environment (.venv-build, git-ignored). Needs a Rust toolchain
# (the wheel's users do not). Prints the wheel's path, tag and size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

compat=manylinux2014
if [ "${1:-}" = "--compatibility" ] && [ -n "${2:-}" ]; then
    compat=$2
fi
PY=${PYTHON:-python3}
if [ ! -x .venv-build/bin/python ]; then
    "$PY" -m venv .venv-build
fi
.venv-build/bin/python -m pip install -q --upgrade pip
.venv-build/bin/python -m pip install -q 'maturin>=1.9,<2' 'ziglang>=0.13'

rm -rf dist
mkdir -p dist
# maturin finds zig through the `python-zig` launcher of the ziglang package, on PATH.
export PATH="$PWD/.venv-build/bin:$PATH"
build=(.venv-build/bin/maturin build --release --strip --zig --compatibility "$compat" --out dist)
if command -v flock >/dev/null; then
    build=(flock /tmp/pystrands-build.lock "${build[@]}")
fi
"${build[@]}" </dev/null
.venv-build/bin/maturin sdist --out dist </dev/null

for f in dist/*; do
    printf '%s\t%s bytes\n' "$f" "$(stat -c %s "$f")"
done
