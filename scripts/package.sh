#!/usr/bin/env bash
# Builds the Debian package (switchboard_VERSION-1_ARCH.deb) and prints its path as the last line of
# stdout. Release binaries of controller (etcd support included; no protoc needed), dataplane, agent and
# loadgen; man pages and shell completions made from their flags (the packaging crate's
# switchboard-assets); then `cargo deb`, with the metadata in packaging/Cargo.toml. Needs dpkg-dev (for
# the package's library dependencies) and installs cargo-deb when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo_deb_version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb ${cargo_deb_version}"; then
    echo "package: installing cargo-deb ${cargo_deb_version}" >&2
    cargo install --quiet --locked cargo-deb --version "${cargo_deb_version}"
fi
for tool in dpkg-shlibdeps:dpkg-dev; do
    command -v "${tool%%:*}" >/dev/null 2>&1 ||
        { echo "package: ${tool%%:*} is missing (apt-get install ${tool#*:})" >&2; exit 1; }
done

# The commit --version prints, computed now: the build script alone notices a new commit, not an edit.
if commit=$(git rev-parse --short=7 HEAD 2>/dev/null); then
    [ -z "$(git --no-optional-locks status --porcelain --untracked-files=no)" ] || commit="${commit}-dirty"
    export SWITCHBOARD_BUILD_COMMIT="${commit}"
fi

cargo build --release -p controller -p dataplane -p agent -p loadgen -p packaging >&2

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
assets="${target_dir}/release/assets"
rm -rf "${assets}"
"${target_dir}/release/switchboard-assets" "${assets}" >/dev/null
# Debian compresses man pages; cargo-deb leaves files from the target folder as they are.
gzip -9n "${assets}"/man/*.1

cargo deb -p packaging --no-build --output "${target_dir}/debian" | tail -n 1
