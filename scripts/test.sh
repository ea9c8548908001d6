#!/usr/bin/env bash
# The test command: installs what the suite needs (scripts/setup-test-deps.sh: as root the Debian packages;
# not as root it prints the one command to run and stops before compiling), then runs
# `cargo test --workspace` with any arguments given, then prints each skip's reason, one line counting the
# skipped tests (`skipped: N`) and one tally of every test binary's results (`tests: N passed, N failed,
# N skipped`, a skipped test counted as skipped, not passed). Exits non-zero when a test failed, or, with CI set, when any test
# was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-test-deps.sh

target="${CARGO_TARGET_DIR:-$PWD/target}"
# grpcurl from the virtual environment the set-up made (its python3 still sees Debian's packages), and,
# not as root, the sbin folders where nginx and ip live.
if [ -d "$target/test-venv/bin" ]; then PATH="$target/test-venv/bin:$PATH"; fi
export PATH="$PATH:/usr/sbin:/sbin"
# Each skipped test appends `SKIPPED: <test>: <reason>` here (tests/src/tools.rs `skip`): cargo shows no
# stderr of a test that passed.
mkdir -p "$target"
export SWITCHBOARD_SKIP_LOG="$target/test-skips.log"
: >"$SWITCHBOARD_SKIP_LOG"

status=0
output="$target/test-output.log"
cargo test --workspace "$@" 2>&1 | tee "$output" || status=$?

skips=0
if [ -s "$SWITCHBOARD_SKIP_LOG" ]; then
    cat "$SWITCHBOARD_SKIP_LOG"
    skips=$(wc -l <"$SWITCHBOARD_SKIP_LOG")
fi
echo "skipped: $skips"
# One tally of the "test result: ok. N passed; N failed; ..." lines of every test binary.
read -r passed failed < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed;.*/\1 \2/p' "$output" |
    awk '{ p += $1; f += $2 } END { print p + 0, f + 0 }')
echo "tests: $((passed - skips)) passed, $failed failed, $skips skipped"
if ((status != 0)); then
    exit "$status"
fi
case "${CI:-}" in
    "" | 0 | false) ;;
    *) if ((skips > 0)); then echo "CI=$CI: a skipped test fails the run" >&2; exit 1; fi ;;
esac
