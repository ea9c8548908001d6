#!/usr/bin/env bash
# Builds the .deb with scripts/package.sh, installs it with dpkg into an empty root (a temporary folder
# with a fresh dpkg database), and checks what landed: the four binaries run and print their version,
# the man pages, completions and units are in place, the installed controller.toml passes
# `controller --check`, the units pass `systemd-analyze verify`, and the package purges cleanly. Used by .ci/run; needs root only in that dpkg wants it.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-package: $*" >&2; exit 1; }
started=${SECONDS}

deb=$(bash scripts/package.sh | tail -n 1)
[ -f "${deb}" ] || fail "scripts/package.sh printed no .deb path (got '${deb}')"
echo "check-package: built ${deb}"

depends=$(dpkg-deb --field "${deb}" Depends)
[[ "${depends}" == *libc6* ]] || fail "Depends names no libc6: '${depends}'"

root=$(mktemp -d)
trap 'rm -rf "${root}"' EXIT
mkdir -p "${root}/var/lib/dpkg/info" "${root}/var/lib/dpkg/updates" "${root}/var/log"
: >"${root}/var/lib/dpkg/status"
: >"${root}/var/lib/dpkg/available"
# --force-depends, and only it: the empty root has no libc6 package to satisfy Depends. The binaries
# run against this machine's libc, which is the one dpkg-shlibdeps computed the dependency from. The
# package has no maintainer scripts, so nothing runs inside the empty root.
out=$(dpkg --root="${root}" --force-depends --install "${deb}" 2>&1) || fail "dpkg --install failed: ${out}"

for bin in controller dataplane agent loadgen; do
    exe="${root}/usr/bin/${bin}"
    [ -x "${exe}" ] || fail "/usr/bin/${bin} not installed"
    version=$("${exe}" --version)
    [[ "${version}" =~ ^${bin}\ [0-9]+\.[0-9]+\.[0-9]+\ \(commit\ ([0-9a-f]{7}(-dirty)?|unknown),\ release\)$ ]] ||
        fail "${bin} --version printed '${version}'"
    echo "check-package: ${version}"
    page="${root}/usr/share/man/man1/${bin}.1.gz"
    [ -f "${page}" ] || fail "no man page ${page#"${root}"}"
    zcat "${page}" | grep -q '^\.TH' || fail "${page#"${root}"} is not a man page"
    for completion in "share/bash-completion/completions/${bin}" "share/zsh/vendor-completions/_${bin}" \
        "share/fish/vendor_completions.d/${bin}.fish"; do
        [ -s "${root}/usr/${completion}" ] || fail "no /usr/${completion}"
    done
done
for conf in controller.toml dataplane.toml; do
    grep -qx "/etc/switchboard/${conf}" "${root}/var/lib/dpkg/info/switchboard.conffiles" ||
        fail "/etc/switchboard/${conf} is not a conffile"
done
checked=$("${root}/usr/bin/controller" --config "${root}/etc/switchboard/controller.toml" --check) ||
    fail "controller --check refused the installed /etc/switchboard/controller.toml"
echo "check-package: controller --check: ${checked/"${root}"/}"
example="${root}/usr/share/doc/switchboard/examples/controller.toml"
"${root}/usr/bin/controller" --config "${example}" --check >/dev/null ||
    fail "controller --check refused the example at /usr/share/doc/switchboard/examples/controller.toml"
for doc in README.md LICENSE copyright; do
    [ -f "${root}/usr/share/doc/switchboard/${doc}" ] || fail "no /usr/share/doc/switchboard/${doc}"
done

units=(switchboard-controller.service switchboard-dataplane.service switchboard-agent@.service)
for unit in "${units[@]}"; do
    [ -f "${root}/lib/systemd/system/${unit}" ] || fail "no /lib/systemd/system/${unit}"
done
if command -v systemd-analyze >/dev/null 2>&1; then
    # Against the root, so ExecStart= finds the installed binaries. The root has nothing else, so this
    # machine's stand in for what a real system has: systemd's own units (sysinit.target, ...) and
    # /bin/kill from procps, which the package depends on. --man=no: the pages are not this machine's.
    mkdir -p "${root}/usr/lib/systemd/system" "${root}/bin"
    cp -a /usr/lib/systemd/system/. "${root}/usr/lib/systemd/system/"
    cp /bin/kill "${root}/bin/kill"
    (cd "${root}/lib/systemd/system" && systemd-analyze verify --root="${root}" --man=no "${units[@]}") ||
        fail "systemd-analyze verify rejected the units"
    rm -rf "${root}/usr/lib/systemd" "${root}/bin/kill"
    echo "check-package: systemd-analyze verify: ${units[*]} ok"
else
    echo "check-package: SKIPPED systemd-analyze verify (no systemd-analyze here; apt-get install systemd)"
fi

out=$(dpkg --root="${root}" --purge switchboard 2>&1) || fail "dpkg --purge failed: ${out}"
left=$(find "${root}" -path "${root}/var" -prune -o -type f -print)
[ -z "${left}" ] || fail "files left after purge: ${left}"

echo "check-package: ok in $((SECONDS - started)) s"
