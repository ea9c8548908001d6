"""Process management: starting the suite's processes and reading their READY lines, stopping them all
whatever happens, waiting for ports, interleaving setups over repetitions, and what a process tree uses
(CPU time, RSS, peak RSS, read from /proc)."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .host import log

# The unit of the CPU times in /proc/PID/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile():
    """Raises this process's soft descriptor limit to its hard one."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Processes:
    """Every process the suite starts, stopped at the end whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, ready=None, name=None):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                                preexec_fn=raise_nofile)
        proc.name = name or Path(cmd[0]).name
        self.procs.append(proc)
        if ready:
            deadline = time.time() + 30
            while time.time() < deadline:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{proc.name} exited before {ready!r}")
                if line.startswith(ready):
                    return proc, line.strip()
            raise RuntimeError(f"{proc.name} printed no {ready!r}")
        return proc, None

    def stop_all(self):
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def wait_port(addr, udp=False, timeout=15):
    import socket

    host, port = addr.rsplit(":", 1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if udp:
            return
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {addr}")


def wait_listening(addr, timeout=15):
    """Waits until a TCP socket listens on `addr`, without connecting to it."""
    host, port = addr.rsplit(":", 1)
    needle = "%08X:%04X" % (int.from_bytes(bytes(map(int, host.split("."))), "little"), int(port))
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == needle and fields[3] == "0A":
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {addr}")


def wait_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def interleaved(name, setups, reps, run_one, describe):
    """`run_one(procs, setup, workdir)` for every setup in turn, `reps` times over (so the machine's drift
    spreads over all setups alike), each setup's processes stopped before the next starts; the runs per
    setup, in order."""
    runs = {setup: [] for setup in setups}
    workdir = Path(tempfile.mkdtemp(prefix=f"switchboard-{name}-"))
    workdir.chmod(0o755)
    try:
        for rep in range(reps):
            for setup in setups:
                procs = Processes()
                try:
                    run = run_one(procs, setup, workdir)
                finally:
                    procs.stop_all()
                runs[setup].append(run)
                log(f"{name} rep {rep + 1} {setup}: {describe(run)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def tree(pid):
    """`pid` and all its descendants."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def rss_mib(pid):
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def peak_rss_mib(pid):
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def measure(pid, fn):
    """Runs `fn`, adding the proxy's CPU time over the run and its RSS after it."""
    before = cpu_seconds(pid) if pid else 0.0
    result = fn()
    if pid:
        result["cpu_s"] = cpu_seconds(pid) - before
        result["rss_mib"] = rss_mib(pid)
    return result


def http_json(addr, path, timeout=5):
    import urllib.request

    return json.loads(urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout).read())
