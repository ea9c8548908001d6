#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, only when it is missing, so it is cheap to
# run every time. Used by .ci/run; safe to run by hand (needs root for apt-get).
set -euo pipefail

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)

if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        echo "setup: adding rustup component ${component}" >&2
        rustup component add "${component}"
    fi
done
