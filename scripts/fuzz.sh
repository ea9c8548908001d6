#!/usr/bin/env bash
# Fuzzes the parsers that face the network, each for a bounded time, on the stable toolchain (no
# sanitizer: `-s none`). Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# A crash leaves its input under fuzz/artifacts/TARGET/; turn it into a regression test before fixing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(json_channel wire proxy_header)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi

for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    # -jobs/-workers 1: one core; the other stays for the machine.
    cargo fuzz run -s none "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 2>&1 \
        | tee "fuzz/$target.log" | grep -E "^(#[0-9]+ +(INITED|DONE)|Done|==[0-9]+==|SUMMARY|.*panicked)" || true
    if grep -qE "^(==[0-9]+== ERROR|SUMMARY)|panicked" "fuzz/$target.log"; then
        echo "fuzz: $target CRASHED; see fuzz/$target.log and fuzz/artifacts/$target/" >&2
        exit 1
    fi
    runs=$(grep -oE "Done [0-9]+ runs" "fuzz/$target.log" | tail -n 1 || true)
    echo "fuzz: $target ok: ${runs:-no run count}"
done
