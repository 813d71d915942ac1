#!/usr/bin/env bash
# Coverage-guided fuzzing of the broker's parsers (cargo-fuzz / libFuzzer, targets in
# fuzz/fuzz_targets/): builds every target, then runs each for SECONDS_PER_TARGET seconds, one at
# a time on one core, starting from the committed seeds (fuzz/seeds/<target>/, copied into the
# git-ignored working corpus fuzz/corpus/<target>/, which keeps growing from run to run).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     # default: 20 s, every target
#
# Prints each target's executions and final coverage line; exits non-zero when a target crashed
# (the input is saved in fuzz/artifacts/<target>/; replay it with the printed command). Works on
# the stable toolchain: RUSTC_BOOTSTRAP=1 lets it take the nightly flags cargo-fuzz passes.
# Installs cargo-fuzz from crates.io when it is missing. Environment: FUZZ_TARGET_DIR (the build
# directory; default /work/fuzz-target, outside the repository, or fuzz/target without /work).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-20}
[ $# -gt 0 ] && shift
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

known=$(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//' | tr '\n' ' ')
for t in "${targets[@]}"; do
    if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
        echo "no such fuzz target: $t (targets: ${known% })" >&2
        exit 2
    fi
done

# Longest input per target: a bit over what the parser accepts, so the "too long" paths run too.
max_len_of() {
    case "$1" in
        http_head) echo 20000 ;;          # request heads: MAX_HEAD is 16 KiB
        backend_line) echo 70000 ;;       # backend lines (and streams of them)
        cluster_envelope) echo 70000 ;;   # Redis payloads
        jwt) echo 120000 ;;               # tokens (headers and query strings)
        *) echo 4096 ;;
    esac
}

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked </dev/null
fi

if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    target_dir=$FUZZ_TARGET_DIR
elif [ -d /work ] && [ -w /work ]; then
    target_dir=/work/fuzz-target
else
    target_dir=$root/fuzz/target
fi
mkdir -p "$target_dir"
triple=$(rustc -vV | sed -n 's/^host: //p')

echo "== building ${targets[*]} (target dir $target_dir)"
build=(env RUSTC_BOOTSTRAP=1 cargo fuzz build --target-dir "$target_dir")
# Share the machine's cores politely with other builds when a lock is there to share.
if command -v flock >/dev/null; then
    build=(flock /tmp/pystrands-build.lock "${build[@]}")
fi
for t in "${targets[@]}"; do
    "${build[@]}" "$t" </dev/null
done

failed=()
summary=()
for t in "${targets[@]}"; do
    bin=$target_dir/$triple/release/$t
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    if [ -d "fuzz/seeds/$t" ]; then
        cp -n "fuzz/seeds/$t"/* "$corpus"/ 2>/dev/null || true
    fi
    args=(-max_total_time="$seconds" -max_len="$(max_len_of "$t")" -timeout=10 -rss_limit_mb=2048
        -print_final_stats=1 -artifact_prefix="$artifacts/")
    [ -f "fuzz/dicts/$t.dict" ] && args+=(-dict="fuzz/dicts/$t.dict")
    log=$(mktemp "${TMPDIR:-/tmp}/fuzz-$t.XXXXXX")
    echo "== $t: ${seconds}s, -max_len=$(max_len_of "$t")"
    set +e
    "$bin" "${args[@]}" "$corpus" </dev/null >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    files=$(find "$corpus" -type f | wc -l)
    line="$t: ${execs:-?} executions, corpus $files files; ${cov:-no coverage line}"
    echo "   $line"
    summary+=("$line")
    if [ $rc -ne 0 ]; then
        failed+=("$t")
        echo "!! $t FAILED (exit $rc); libFuzzer's report:"
        grep -vE '^#[0-9]+|^INFO:|NEW_FUNC|Uses: [0-9]+' "$log" | head -n 60 || true
        crash=$(sed -n 's/.*Test unit written to //p' "$log" | tail -n 1)
        if [ -n "$crash" ]; then
            echo "!! input: $crash"
            echo "!! replay: RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir $target_dir $t $crash"
        fi
    fi
    rm -f "$log"
done

echo "== summary (${seconds}s per target)"
printf '   %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}"
    exit 1
fi
echo "fuzzing: no crash in ${#targets[@]} targets"
