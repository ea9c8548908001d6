"""This machine: the repository's paths, logging, bounded commands, the peers and tools installed from
Debian, the release build, and the description of the machine each result carries."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = ROOT / "target" / "release"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def run(cmd, timeout, check=True):
    """Runs a command to completion (bounded) and returns its stdout."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return result.stdout


def install_peers():
    """Installs from Debian whatever is missing."""
    needed = []
    for tool, package in [("haproxy", "haproxy"), ("nginx", "nginx"), ("wrk", "wrk"), ("iperf3", "iperf3")]:
        if shutil.which(tool) is None:
            needed.append(package)
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        needed.append("libnginx-mod-stream")
    if needed:
        log(f"installing {' '.join(needed)} from Debian")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *needed], check=True, env=env, timeout=900)


def build(features=()):
    log("building release binaries")
    extra = ["--features", ",".join(features)] if features else []
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins", *extra], cwd=ROOT, check=True, timeout=1800)


def build_packages(*packages):
    log(f"building {', '.join(packages)} (release)")
    cmd = ["cargo", "build", "--release", "--quiet"] + [a for p in packages for a in ("-p", p)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800)


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    versions = {}
    for tool, cmd in [("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "-v"]),
                      ("iperf3", ["iperf3", "-v"])]:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[tool] = "unavailable"
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu, "versions": versions}
