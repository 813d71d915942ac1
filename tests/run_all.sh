#!/usr/bin/env bash
# Installs everything the tests need (in .venv) and runs all of them: Rust unit tests, then pytest.
# Usage: bash tests/run_all.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The test, lint and benchmark tools (the `dev` dependency group of pyproject.toml).
.venv/bin/python -m pip install -q --group dev
# The package the way users get it: a wheel given in PYSTRANDS_WHEEL (what .ci/run builds with
# scripts/build-wheels.sh), else built from this checkout (maturin compiles the native core).
if [ -n "${PYSTRANDS_WHEEL:-}" ]; then
    .venv/bin/python -m pip install -q --force-reinstall "$PYSTRANDS_WHEEL"
else
    .venv/bin/python -m pip install -q .
fi

# PyStrands 1.0 from PyPI, in its own environment, for the compatibility tests.
if [ ! -x .venv-v1/bin/python ]; then
    "$PY" -m venv .venv-v1
    .venv-v1/bin/python -m pip install -q 'pystrands==1.0.0'
fi

echo "== lint =="
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
.venv/bin/ruff check python tests benches scripts docs/hooks
.venv/bin/mypy --strict python/pystrands

echo "== cargo test =="
cargo test -p pystrands-core

echo "== pytest =="
# Run from tests/ so `import pystrands` resolves to the installed package, not the source tree.
cd tests
PYSTRANDS_V1_PYTHON="$PWD/../.venv-v1/bin/python" ../.venv/bin/python -m pytest -q -p no:cacheprovider "$@" .
