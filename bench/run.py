#!/usr/bin/env python3
"""Switchboard benchmark suite: direct-to-backend, Switchboard, HAProxy (mode tcp) and nginx stream, side by
side on this machine, interleaved over several repetitions, reported as medians and ratios.

    python3 bench/run.py            # full run: 3 repetitions
    python3 bench/run.py --quick    # one short repetition, under 3 minutes
    python3 bench/run.py --scenario pydirector   # 1, 2, 4 CPU-bound backends behind two nodes, to saturation
    python3 bench/run.py --scenario skew         # skewed load: balance per algorithm, counts shared or not
    python3 bench/run.py --scenario paired --before DIR [--rounds N]   # this build against DIR's, wrk rounds
                                                 # alternating, then instructions per request (callgrind)
    python3 bench/run.py --scenario replicas [--quick]   # registration -> frontend open through etcd vs in memory
    python3 bench/run.py --scenario tasks [--quick] [--cpu real]   # CPU tasks on four backends, one hogged: completion
                                                 # times with round robin, least connections, least_load
    python3 bench/run.py --scenario control-plane [--quick]   # the controller at scale: 1,000 services x 10
                                                 # backends to 100 simulated nodes (quick: 200 x 10 to 20)
    python3 bench/run.py --scenario upgrade [--quick]   # three upgrades under load: Switchboard --takeover,
                                                 # HAProxy master-worker reload, nginx reload; errors and gaps

Everything runs on 127.0.0.0/8 and every run is bounded in time. Missing peers and tools (haproxy, nginx
with the stream module, wrk, iperf3) are installed from Debian. Results go to bench/results/ (JSON and SVG)
and the tables are printed as Markdown for BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = ROOT / "target" / "release"

# Addresses: backends, then one frontend address per proxy, all loopback.
HTTP_BACKENDS = ["127.0.0.11:8080", "127.0.0.12:8080"]
IPERF_BACKEND = "127.0.0.21:5201"
UDP_BACKENDS = ["127.0.0.31:9000", "127.0.0.32:9000"]
# Holds the idle connections of the memory row; its stats tell how many reached it.
IDLE_BACKEND = "127.0.0.13:8082"
IDLE_STATS = "127.0.0.13:8083"
# This machine's hard descriptor limit is 20,000 per process and cannot be raised here; a proxied
# connection takes two, and Switchboard leaves clients 85% of its descriptors (the rest is the control
# plane's): 8,000 fit in every proxy.
IDLE_CONNECTIONS = 8_000
CONTROLLER_IP = "127.0.0.40"
PORTS = {"http": 18080, "bulk": 15201, "udp": 19000, "idle": 18082}
PROXY_IPS = {
    "switchboard": "127.0.0.41",
    "haproxy": "127.0.0.42",
    "haproxy-1t": "127.0.0.44",
    "nginx": "127.0.0.43",
    # Lever variants (--levers): the same suite against Switchboard with one lever off, and against the
    # build before them (--before).
    "switchboard-before": "127.0.0.45",
    "switchboard-1w": "127.0.0.46",
    "switchboard-copy": "127.0.0.47",
}
PEERS_AND_US = ("switchboard", "haproxy", "haproxy-1t", "nginx")
VARIANT_FLAGS = {"switchboard-1w": ["--workers", "1"], "switchboard-copy": ["--splice-pipes", "0"]}
# Every process the suite starts gets its soft descriptor limit raised to the hard one.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def run(cmd, timeout, check=True):
    """Runs a command to completion (bounded) and returns its stdout."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return result.stdout


# --------------------------------------------------------------------------------------------------------
# Set-up


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


def start_backends(procs, workdir):
    www = workdir / "www"
    www.mkdir()
    (www / "64b").write_bytes(b"x" * 63 + b"\n")
    # nginx workers run unprivileged: the temporary directory must be readable to them.
    for path in (workdir, www):
        path.chmod(0o755)
    (www / "64b").chmod(0o644)
    conf = workdir / "backend-nginx.conf"
    listens = "\n".join(f"    listen {a} reuseport backlog=4096;" for a in HTTP_BACKENDS)
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/backend-nginx.pid;
error_log {workdir}/backend-nginx.err;
worker_rlimit_nofile 20000;
events {{ worker_connections 8000; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  server {{
{listens}
    root {www};
  }}
}}
""")
    procs.start(["nginx", "-c", str(conf)], name="backend-nginx")
    for addr in UDP_BACKENDS:
        procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "udp-echo", "--listen", addr], ready="READY")
    procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "tcp-echo", "--listen", IDLE_BACKEND,
                 "--stats-listen", IDLE_STATS], ready="READY")
    for addr in HTTP_BACKENDS:
        wait_port(addr)



def start_switchboard(procs, name="switchboard", bin_dir=BIN, extra=()):
    ip = PROXY_IPS[name]
    proc, line = procs.start(
        [
            str(bin_dir / "controller"),
            "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen", f"{CONTROLLER_IP}:0",
            "--admin-listen", f"{CONTROLLER_IP}:0", "--frontend-address", ip, "--resync-grace", "0s",
            "--max-connections-per-service", str(3 * IDLE_CONNECTIONS), *extra,
        ],
        ready="READY",
        name=name,
    )
    grpc = re.search(r"grpc=(\S+)", line).group(1)
    agent = str(bin_dir / "agent")
    registrations = [("tcp", PORTS["http"], a) for a in HTTP_BACKENDS]
    registrations += [("tcp", PORTS["bulk"], IPERF_BACKEND), ("tcp", PORTS["idle"], IDLE_BACKEND)]
    registrations += [("udp", PORTS["udp"], a) for a in UDP_BACKENDS]
    for protocol, port, backend in registrations:
        bip, bport = backend.rsplit(":", 1)
        procs.start(
            [agent, "--controller", f"http://{grpc}", "--protocol", protocol, "--port", str(port),
             "--backend-address", bip, "--backend-port", bport, "--check", "none"],
            ready="READY",
            name="agent",
        )
    return proc


def start_haproxy(procs, workdir, name, threads):
    ip = PROXY_IPS[name]
    servers = "\n".join(f"  server s{i} {a}" for i, a in enumerate(HTTP_BACKENDS))
    nbthread = f"  nbthread {threads}\n" if threads else ""
    conf = workdir / f"{name}.cfg"
    conf.write_text(f"""
global
{nbthread}  maxconn {IDLE_CONNECTIONS + 500}
  maxpipes 500
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend http_fe
  bind {ip}:{PORTS['http']}
  default_backend http_be
backend http_be
  balance roundrobin
{servers}
frontend bulk_fe
  bind {ip}:{PORTS['bulk']}
  default_backend bulk_be
backend bulk_be
  option splice-request
  option splice-response
  server iperf {IPERF_BACKEND}
frontend idle_fe
  bind {ip}:{PORTS['idle']}
  default_backend idle_be
backend idle_be
  server idle {IDLE_BACKEND}
""")
    proc, _ = procs.start(["haproxy", "-db", "-f", str(conf)], name=name)
    wait_port(f"{ip}:{PORTS['http']}")
    return proc


def start_nginx(procs, workdir, name, stream, workers="auto", connections=1024, nofile=None):
    """nginx in the foreground with `stream` as its stream block, its configuration, pid and error log in
    `workdir` under `name`; returns the master process."""
    rlimit = f"worker_rlimit_nofile {nofile};\n" if nofile else ""
    conf = workdir / f"{name}.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {workers};
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err;
{rlimit}events {{ worker_connections {connections}; }}
stream {{
{stream}
}}
""")
    proc, _ = procs.start(["nginx", "-c", str(conf)], name="nginx")
    return proc


def start_nginx_stream(procs, workdir):
    ip = PROXY_IPS["nginx"]
    http = "\n".join(f"    server {a};" for a in HTTP_BACKENDS)
    udp = "\n".join(f"    server {a};" for a in UDP_BACKENDS)
    proc = start_nginx(procs, workdir, "nginx-stream", f"""  upstream http_be {{
{http}
  }}
  upstream udp_be {{
{udp}
  }}
  server {{ listen {ip}:{PORTS['http']} backlog=4096; proxy_pass http_be; }}
  server {{ listen {ip}:{PORTS['bulk']}; proxy_pass {IPERF_BACKEND}; }}
  server {{ listen {ip}:{PORTS['udp']} udp reuseport; proxy_pass udp_be; proxy_timeout 10s; }}
  server {{ listen {ip}:{PORTS['idle']} backlog=4096; proxy_pass {IDLE_BACKEND}; }}""",
                       connections=2 * IDLE_CONNECTIONS + 2000, nofile=2 * IDLE_CONNECTIONS + 3000)
    wait_port(f"{ip}:{PORTS['http']}")
    return proc


# --------------------------------------------------------------------------------------------------------
# Measurement


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


def wrk(addr, seconds, close):
    cmd = ["wrk", "-t2", "-c50", f"-d{seconds}s", f"http://{addr}/64b"]
    if close:
        cmd[1:1] = ["-H", "Connection: close"]
    out = run(cmd, timeout=seconds + 30)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    # wrk counts error responses as requests: a run with any is not a measurement.
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk against {addr}: {bad.group(0)}")
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rate": rate, "requests": rate * seconds, "errors": errors.group(1) if errors else ""}


def iperf(addr, seconds, streams):
    """One iperf3 test through `addr`, against a one-off iperf3 server started for it: a long-lived server
    can wedge after a test whose connections a proxy tore down, so none is reused."""
    host, port = addr.rsplit(":", 1)
    server_host, server_port = IPERF_BACKEND.rsplit(":", 1)
    for attempt in range(3):
        server = subprocess.Popen(["iperf3", "-s", "-1", "-B", server_host, "-p", server_port],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # A bare connect would count as a test: watch for the listening socket instead.
            wait_listening(IPERF_BACKEND)
            try:
                out = run(["iperf3", "-c", host, "-p", port, "-t", str(seconds), "-P", str(streams), "-J",
                           "--connect-timeout", "3000"], timeout=seconds + 20, check=False)
            except subprocess.TimeoutExpired:
                out = ""
            data = json.loads(out or "{}")
            received = data.get("end", {}).get("sum_received")
            if received:
                return {"gbit": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}
            log(f"iperf3 via {addr}: {data.get('error', 'no result')}; retrying")
        finally:
            server.kill()
            server.wait()
    raise RuntimeError(f"iperf3 via {addr} gave no result")


def loadgen(args, seconds):
    # The suite judges errors itself (checked()): loadgen's own --max-errors would end the run.
    out = run([str(BIN / "loadgen"), *args, "--duration", f"{seconds}s", "--quiet", "--json", "-", "--max-errors", "100"],
              timeout=seconds + 30)
    return json.loads(out)


def udp_rate(addr, seconds):
    report = checked(loadgen(["udp", "--target", addr, "--connections", "32", "--size", "64"], seconds), f"udp {addr}")
    return {"rate": report["achieved_rps"], "requests": report["ok"], "errors": sum(report["errors"].values())}


def checked(report, what):
    """A loadgen report, refusing runs where most requests failed (a broken set-up, not a measurement)."""
    errors = sum(report["errors"].values())
    if errors > report["ok"]:
        raise RuntimeError(f"{what}: {errors} errors for {report['ok']} answers: {report['errors']}")
    return report


def latency_at(addr, rate, seconds):
    report = checked(loadgen(["http", "--target", addr, "--path", "/64b", "--rate", str(rate), "--connections", "50"], seconds), f"latency {addr}")
    lat = report["latency_us"] or {}
    return {"rate": rate, "p50": lat.get("p50"), "p99": lat.get("p99"), "p999": lat.get("p999"),
            "errors": sum(report["errors"].values())}


def idle_backend_active():
    host, port = IDLE_STATS.rsplit(":", 1)
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as reply:
        return json.loads(reply.read())["active"]


def wait_idle_active(count, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        active = idle_backend_active()
        if active == count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the idle backend holds {idle_backend_active()} connections, not {count}")


def idle_rss(pid, addr):
    """RSS of the proxy before, and while it holds IDLE_CONNECTIONS idle proxied connections (each one
    connected end to end: the backend counts it)."""
    import socket

    wait_idle_active(0)
    before = rss_mib(pid)
    host, port = addr.rsplit(":", 1)
    sockets = []
    try:
        # In steps the proxy can accept as fast as they come: a connection the kernel completed into a full
        # accept queue would never reach the backend.
        for _ in range(IDLE_CONNECTIONS // 500):
            for _ in range(500):
                sockets.append(socket.create_connection((host, int(port)), timeout=5))
            wait_idle_active(len(sockets))
        held = rss_mib(pid)
    finally:
        for sock in sockets:
            sock.close()
    wait_idle_active(0)
    return {"rss_before_mib": before, "rss_idle_mib": held}


def measure(pid, fn):
    """Runs `fn`, adding the proxy's CPU time over the run and its RSS after it."""
    before = cpu_seconds(pid) if pid else 0.0
    result = fn()
    if pid:
        result["cpu_s"] = cpu_seconds(pid) - before
        result["rss_mib"] = rss_mib(pid)
    return result


# --------------------------------------------------------------------------------------------------------
# The suite


def suite(args):
    install_peers()
    build()
    seconds = {"bulk": 2 if args.quick else 5, "wrk": 3 if args.quick else 10, "udp": 2 if args.quick else 5,
               "latency": 3 if args.quick else 5}
    reps = args.reps or (1 if args.quick else 3)
    procs = Processes()
    results = {"machine": machine(), "quick": args.quick, "reps": reps, "seconds": seconds, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            start_backends(procs, workdir)
            pids = {
                "direct": None,
                "switchboard": start_switchboard(procs).pid,
                "haproxy": start_haproxy(procs, workdir, "haproxy", None).pid,
                "haproxy-1t": start_haproxy(procs, workdir, "haproxy-1t", 1).pid,
                "nginx": start_nginx_stream(procs, workdir).pid,
            }
            if args.levers:
                chosen = VARIANT_FLAGS if args.variants is None else {
                    name: VARIANT_FLAGS[name] for name in args.variants.split(",") if name}
                for name, flags in chosen.items():
                    pids[name] = start_switchboard(procs, name, extra=flags).pid
                if args.before:
                    pids["switchboard-before"] = start_switchboard(procs, "switchboard-before", Path(args.before)).pid
            for port_kind in ("http", "bulk"):
                wait_port(f"{PROXY_IPS['switchboard']}:{PORTS[port_kind]}")
            targets = {name: {kind: f"{ip}:{PORTS[kind]}" for kind in PORTS} for name, ip in PROXY_IPS.items()}
            targets["direct"] = {"http": HTTP_BACKENDS[0], "bulk": IPERF_BACKEND, "udp": UDP_BACKENDS[0]}
            udp_capable = ["direct", "nginx", *(n for n in pids if n.startswith("switchboard"))]
            for rep in range(reps):
                # Rotate the order every repetition so no proxy always runs first or last.
                order = list(pids)
                order = order[rep % len(order):] + order[: rep % len(order)]
                run_rep = {"rep": rep, "order": order, "results": {}}
                for name in order:
                    log(f"rep {rep + 1}/{reps}: {name}")
                    pid, t = pids[name], targets[name]
                    r = {}
                    r["bulk1"] = measure(pid, lambda: iperf(t["bulk"], seconds["bulk"], 1))
                    r["bulk4"] = measure(pid, lambda: iperf(t["bulk"], seconds["bulk"], 4))
                    r["newconn"] = measure(pid, lambda: wrk(t["http"], seconds["wrk"], close=True))
                    r["keepalive"] = measure(pid, lambda: wrk(t["http"], seconds["wrk"], close=False))
                    if name in udp_capable:
                        r["udp"] = measure(pid, lambda: udp_rate(t["udp"], seconds["udp"]))
                    run_rep["results"][name] = r
                # Latency at a fixed rate below saturation: half the slowest keep-alive rate of this repetition.
                slowest = min(run_rep["results"][n]["keepalive"]["rate"] for n in order if n in PEERS_AND_US)
                rate = int(slowest * 0.5)
                for name in order:
                    pid, t = pids[name], targets[name]
                    run_rep["results"][name]["latency"] = measure(pid, lambda: latency_at(t["http"], rate, seconds["latency"]))
                # Memory: each proxy holding the same idle connections.
                for name in order:
                    if name != "direct":
                        log(f"rep {rep + 1}/{reps}: {name}, {IDLE_CONNECTIONS:,} idle connections")
                        run_rep["results"][name]["idle"] = idle_rss(pids[name], targets[name]["idle"])
                # The load driver itself against wrk, both on keep-alive HTTP straight to nginx.
                run_rep["loadgen_vs_wrk"] = {
                    "wrk": wrk(targets["direct"]["http"], seconds["wrk"], close=False)["rate"],
                    "loadgen": checked(loadgen(["http", "--target", targets["direct"]["http"], "--path", "/64b",
                                                "--connections", "50", "--threads", "2"], seconds["wrk"]),
                                       "loadgen against nginx")["achieved_rps"],
                }
                results["runs"].append(run_rep)
        finally:
            procs.stop_all()
    return results


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


# --------------------------------------------------------------------------------------------------------
# Reporting

WORKLOADS = [
    ("bulk1", "bulk, 1 stream (iperf3)", "gbit", "Gbit/s"),
    ("bulk4", "bulk, 4 streams (iperf3)", "gbit", "Gbit/s"),
    ("newconn", "new connection per request (wrk, Connection: close)", "rate", "req/s"),
    ("keepalive", "keep-alive requests (wrk)", "rate", "req/s"),
    ("udp", "UDP request/response (loadgen, 32 flows)", "rate", "req/s"),
]


def summarize(results):
    names = list(results["runs"][0]["results"])
    table = {}
    for key, _, metric, _ in WORKLOADS:
        for name in names:
            values, ratios, cpu = [], [], []
            for run_rep in results["runs"]:
                r = run_rep["results"][name].get(key)
                direct = run_rep["results"]["direct"].get(key)
                if not r or not direct:
                    continue
                values.append(r[metric])
                ratios.append(r[metric] / direct[metric] if direct[metric] else 0.0)
                if "cpu_s" in r:
                    if metric == "gbit":
                        cpu.append(r["cpu_s"] / (r["bytes"] / 1e9) if r["bytes"] else 0.0)
                    else:
                        cpu.append(r["cpu_s"] * 1e6 / r["requests"] if r["requests"] else 0.0)
            if values:
                table[(key, name)] = {
                    "median": statistics.median(values), "min": min(values), "max": max(values),
                    "ratio": statistics.median(ratios), "cpu": statistics.median(cpu) if cpu else None,
                    "rss": statistics.median([run_rep["results"][name][key].get("rss_mib", 0) for run_rep in results["runs"]
                                              if key in run_rep["results"][name]]),
                }
    return names, table


def markdown(results):
    names, table = summarize(results)
    m = results["machine"]
    out = [f"Machine: {m['nproc']} cores, {m['cpu']}, kernel {m['kernel']}. "
           f"{', '.join(m['versions'].values())}. "
           f"{results['reps']} repetition(s){' (quick mode)' if results['quick'] else ''}, medians.", ""]
    peers = [n for n in names if n.startswith("haproxy") or n == "nginx"]
    for key, title, metric, unit in WORKLOADS:
        rows = [n for n in names if (key, n) in table]
        if not rows:
            continue
        best_peer = max((table[(key, n)]["median"] for n in peers if (key, n) in table), default=None)
        cpu_unit = "CPU s/GB" if metric == "gbit" else "CPU µs/req"
        out += [f"### {title}", "", f"| | median {unit} | min–max | × direct | × best peer | {cpu_unit} |",
                "|---|---|---|---|---|---|"]
        for n in rows:
            t = table[(key, n)]
            vs_peer = f"{t['median'] / best_peer:.2f}" if best_peer and n != "direct" else ""
            cpu = f"{t['cpu']:.2f}" if t["cpu"] is not None else ""
            fmt = (lambda v: f"{v:.2f}") if metric == "gbit" else (lambda v: f"{v:,.0f}")
            out.append(f"| {n} | {fmt(t['median'])} | {fmt(t['min'])}–{fmt(t['max'])} | {t['ratio']:.2f} | {vs_peer} | {cpu} |")
        out.append("")
    # Latency at fixed rate.
    out += ["### latency at a fixed rate (loadgen, open loop, 50 connections, keep-alive HTTP)", "",
            "| | rate | p50 µs | p99 µs | p99.9 µs | errors |", "|---|---|---|---|---|---|"]
    for n in names:
        lat = [r["results"][n]["latency"] for r in results["runs"]]
        med = lambda k: statistics.median([x[k] for x in lat if x.get(k) is not None] or [0])
        out.append(f"| {n} | {lat[0]['rate']:,} | {med('p50'):.0f} | {med('p99'):.0f} | {med('p999'):.0f} | "
                   f"{sum(x['errors'] for x in lat)} |")
    out.append("")
    out += [f"### memory: {IDLE_CONNECTIONS:,} idle proxied connections", "",
            "| | RSS before, MiB | RSS holding them, MiB | KiB per connection |", "|---|---|---|---|"]
    for n in names:
        idle = [r["results"][n]["idle"] for r in results["runs"] if "idle" in r["results"][n]]
        if idle:
            before = statistics.median(x["rss_before_mib"] for x in idle)
            held = statistics.median(x["rss_idle_mib"] for x in idle)
            out.append(f"| {n} | {before:.1f} | {held:.1f} | {(held - before) * 1024 / IDLE_CONNECTIONS:.2f} |")
    out.append("")
    rss = {n: statistics.median([r["results"][n]["keepalive"].get("rss_mib", 0) for r in results["runs"]]) for n in names if n != "direct"}
    out += ["RSS after the keep-alive run (MiB): " + ", ".join(f"{n} {v:.1f}" for n, v in rss.items()), ""]
    lw = [r["loadgen_vs_wrk"] for r in results["runs"]]
    ratio = statistics.median([x["loadgen"] / x["wrk"] for x in lw])
    out += [f"loadgen against wrk, keep-alive HTTP straight to nginx, 50 connections: wrk "
            f"{statistics.median([x['wrk'] for x in lw]):,.0f} req/s, loadgen "
            f"{statistics.median([x['loadgen'] for x in lw]):,.0f} req/s: **{ratio:.2f}× wrk**.", ""]
    return "\n".join(out)


def svg_bars(results, path):
    """One group of bars per workload: each proxy's ratio to direct."""
    names, table = summarize(results)
    names = [n for n in names if n != "direct"]
    colors = {"switchboard": "#1f77b4", "haproxy": "#ff7f0e", "haproxy-1t": "#ffbb78", "nginx": "#2ca02c"}
    width, height, left, top, bar = 900, 360, 60, 40, 28
    groups = [w for w in WORKLOADS if any((w[0], n) in table for n in names)]
    group_w = (width - left - 20) / max(len(groups), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-family="sans-serif" font-size="15">'
             'Throughput as a ratio to direct-to-backend (median; higher is better)</text>']
    plot_h = height - top - 70
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 20}" y2="{top + plot_h}" stroke="#444"/>')
    for tick in (0.25, 0.5, 0.75, 1.0):
        y = top + plot_h - tick * plot_h
        parts.append(f'<line x1="{left}" y1="{y}" x2="{width - 20}" y2="{y}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" font-family="sans-serif" font-size="11">{tick:.2f}</text>')
    for gi, (key, title, _, _) in enumerate(groups):
        gx = left + gi * group_w + 10
        for ni, n in enumerate(names):
            if (key, n) not in table:
                continue
            ratio = min(table[(key, n)]["ratio"], 1.2)
            h = ratio * plot_h
            x = gx + ni * bar
            parts.append(f'<rect x="{x}" y="{top + plot_h - h}" width="{bar - 4}" height="{h}" fill="{colors.get(n, "#999")}">'
                         f'<title>{n}: {table[(key, n)]["ratio"]:.2f}</title></rect>')
        label = title.split(" (")[0]
        parts.append(f'<text x="{gx + len(names) * bar / 2}" y="{top + plot_h + 16}" text-anchor="middle" '
                     f'font-family="sans-serif" font-size="11">{label}</text>')
    for ni, n in enumerate(names):
        parts.append(f'<rect x="{left + ni * 140}" y="{height - 28}" width="12" height="12" fill="{colors.get(n, "#999")}"/>')
        parts.append(f'<text x="{left + ni * 140 + 16}" y="{height - 18}" font-family="sans-serif" font-size="12">{n}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# --------------------------------------------------------------------------------------------------------
# PyDirector characterization


def pydirector(args):
    """Two nodes, 1, 2 and 4 CPU-bound backends (2 ms of CPU per request, one thread each), driven at
    25 % to 125 % of their capacity: where does each setup saturate? (The skewed load is `--scenario skew`.)"""
    build()
    procs = Processes()
    work_us = 2000
    out = {"work_us": work_us, "saturation": {}}
    try:
        for backends in (1, 2, 4):
            ctl, line = procs.start([str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen",
                                     f"{CONTROLLER_IP}:0", "--admin-listen", f"{CONTROLLER_IP}:0",
                                     "--no-embedded-dataplane", "--resync-grace", "0s"], ready="READY", name="controller")
            json_addr = re.search(r"json=(\S+)", line).group(1)
            grpc = re.search(r"grpc=(\S+)", line).group(1)
            nodes = []
            for i, ip in enumerate(("127.0.0.51", "127.0.0.52")):
                node, _ = procs.start([str(BIN / "dataplane"), "--controller", f"http://{grpc}", "--node-id", f"n{i + 1}",
                                       "--frontend-address", ip, "--admin-listen", f"{ip}:0"], ready="READY")
                nodes.append((node, ip))
            for b in range(backends):
                ip = f"127.0.0.{61 + b}"
                procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "http", "--listen", f"{ip}:18500",
                             "--work-us", str(work_us), "--register", json_addr], ready="READY")
            time.sleep(1)  # let both nodes apply the registrations (a bench, not a test)
            targets = [f"{ip}:18500" for _, ip in nodes]
            capacity = backends * 1e6 / work_us
            steps = []
            for fraction in (0.25, 0.5, 0.75, 1.0, 1.25):
                rate = int(capacity * fraction)
                report = loadgen(["http", *sum((["--target", t] for t in targets), []), "--rate", str(rate),
                                  "--connections", "64", "--timeout", "2s"], 3 if args.quick else 5)
                lat = report["latency_us"] or {}
                steps.append({"rate": rate, "achieved": report["achieved_rps"], "p99_us": lat.get("p99"),
                              "errors": sum(report["errors"].values())})
                log(f"pydirector {backends} backend(s) at {rate}/s: {report['achieved_rps']:.0f}/s p99 {lat.get('p99')}")
            saturated = next((s["rate"] for s in steps if s["achieved"] < 0.95 * s["rate"] or s["errors"]), None)
            out["saturation"][backends] = {"capacity": capacity, "steps": steps, "saturates_at": saturated}
            procs.stop_all()
            procs = Processes()
    finally:
        procs.stop_all()
    return out


TASK_BACKENDS = [f"127.0.0.{81 + i}:18600" for i in range(4)]
TASK_FRONTENDS = {"switchboard": "127.0.0.71:18600", "haproxy": "127.0.0.72:18600", "nginx": "127.0.0.73:18600"}
TASK_SETUPS = ["switchboard round_robin", "switchboard least_connections", "switchboard least_load",
               "haproxy leastconn", "nginx least_conn"]


def tasks(args):
    """The container balancer's workload: CPU-bound tasks of 100-600 ms (the issue's 1-6 s scaled by 1/10, so
    a run takes seconds) arriving at a steady rate on four backends, the last of them slowed by a CPU hog
    inside its process. Completion time, from a task's intended start to its answer, per balancer:
    Switchboard's round_robin, least_connections and least_load (agents report each backend's own CPU use
    with --load-command), HAProxy's leastconn and nginx's least_conn (which have no load reports). Setups
    are interleaved within each repetition; the table gives medians over repetitions."""
    import random

    build()
    install_peers()
    emulate = args.cpu == "emulated"
    # Emulated, each backend has a core of its own: four of them take more tasks than two real cores.
    n, rate = (24, 4.0 if emulate else 3.0) if args.quick else (60, 4.0 if emulate else 3.0)
    reps = 1 if args.quick else (args.reps or 3)
    works = [random.Random(7 + i).randint(100, 600) for i in range(n)]

    def run_one(procs, setup, workdir):
        times = drive_tasks(start_task_setup(procs, setup, workdir, emulate), works, rate)
        done = sorted(t for t in times if t is not None)
        return {"p50_s": percentile(done, 50), "p99_s": percentile(done, 99), "failed": n - len(done)}

    describe = lambda run: f"p50 {run['p50_s']:.2f} s, p99 {run['p99_s']:.2f} s, {run['failed']} failed"
    runs = interleaved("tasks", TASK_SETUPS, reps, run_one, describe)
    summary = {setup: {"p50_s": statistics.median(r["p50_s"] for r in rs), "p99_s": statistics.median(r["p99_s"] for r in rs),
                       "failed": sum(r["failed"] for r in rs)} for setup, rs in runs.items()}
    return {"machine": machine(), "scenario": "tasks", "cpu": args.cpu, "tasks": n, "rate_per_s": rate, "work_ms": [100, 600],
            "reps": reps, "runs": runs, "summary": summary}


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


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def start_task_setup(procs, setup, workdir, emulate):
    """The four task backends (the last with a hog) behind `setup`; returns its frontend."""
    for i, addr in enumerate(TASK_BACKENDS):
        hog = ["--hog"] if i == len(TASK_BACKENDS) - 1 else []
        mode = ["--emulate"] if emulate else []
        procs.start([sys.executable, str(ROOT / "bench" / "taskserver.py"), addr, *hog, *mode], ready="READY")
    balancer, algorithm = setup.split()
    frontend = TASK_FRONTENDS[balancer]
    fip, port = frontend.rsplit(":", 1)
    if balancer == "switchboard":
        _, line = procs.start([str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen",
                               f"{CONTROLLER_IP}:0", "--admin-listen", f"{CONTROLLER_IP}:0", "--frontend-address", fip,
                               "--resync-grace", "0s", "--hello-interval", "500ms", "--load-report-max-age", "3s"],
                              ready="READY", name="controller")
        grpc = re.search(r"grpc=(\S+)", line).group(1)
        admin = re.search(r"admin=(\S+)", line).group(1)
        for addr in TASK_BACKENDS:
            ip = addr.rsplit(":", 1)[0]
            report = (["--report-load", "--load-command", f"curl -s --max-time 0.5 http://{addr}/load"]
                      if algorithm == "least_load" else [])
            procs.start([str(BIN / "agent"), "--controller", f"http://{grpc}", "--protocol", "tcp", "--port", port,
                         "--backend-address", ip, "--algorithm", algorithm, "--check", "none", "--check-interval",
                         "300ms", *report], ready="READY")
        deadline = time.time() + 15
        while True:
            backends = http_json(admin, "/api/state")["services"][0]["backends"]
            reported = all(b.get("reported_load") is not None for b in backends)
            if len(backends) == len(TASK_BACKENDS) and (reported or algorithm != "least_load"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"switchboard {algorithm}: backends not ready: {backends}")
            time.sleep(0.1)
    elif balancer == "haproxy":
        servers = "\n".join(f"  server s{i} {a}" for i, a in enumerate(TASK_BACKENDS))
        conf = workdir / "tasks-haproxy.cfg"
        conf.write_text(f"""
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend tasks_fe
  bind {frontend}
  default_backend tasks_be
backend tasks_be
  balance leastconn
{servers}
""")
        procs.start(["haproxy", "-db", "-f", str(conf)], name="haproxy")
    else:
        servers = "\n".join(f"    server {a};" for a in TASK_BACKENDS)
        start_nginx(procs, workdir, "tasks-nginx", f"""  upstream tasks_be {{
    least_conn;
{servers}
  }}
  server {{ listen {frontend}; proxy_pass tasks_be; proxy_timeout 120s; }}""", workers=1)
    wait_port(frontend)
    return frontend


def drive_tasks(frontend, works, rate):
    """Sends task i at its intended time i / rate (open loop: a slow balancer's queueing is measured) and
    returns each task's completion time in seconds, from its intended start (None: failed)."""
    import socket

    host, port = frontend.rsplit(":", 1)
    times = [None] * len(works)
    start = time.monotonic() + 0.5

    def one(i, ms):
        intended = start + i / rate
        time.sleep(max(0.0, intended - time.monotonic()))
        try:
            with socket.create_connection((host, int(port)), timeout=120) as sock:
                sock.sendall(f"GET /task?ms={ms} HTTP/1.0\r\nHost: tasks\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            if b" 200 " in data.split(b"\r\n", 1)[0]:
                times[i] = time.monotonic() - intended
        except OSError:
            pass

    threads = [threading.Thread(target=one, args=(i, ms)) for i, ms in enumerate(works)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return times


def tasks_markdown(result):
    rows = ["| balancer | task completion p50 | p99 | failed |", "|---|---|---|---|"]
    for setup, s in result["summary"].items():
        rows.append(f"| {setup} | {s['p50_s']:.2f} s | {s['p99_s']:.2f} s | {s['failed']} |")
    return "\n".join(rows)


def hold(frontend, keep):
    """A kept-alive HTTP connection through `frontend`; returns the backend that answered."""
    import socket

    host, port = frontend.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    data = b""
    while b"hello from " not in data or not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            raise RuntimeError(f"{frontend} closed the connection")
        data += chunk
    keep.append(sock)
    return data.split(b"hello from ", 1)[1].split(b"\n", 1)[0].decode()


def node_sees(admin, total, timeout=15):
    """Waits until a node counts `total` connections: its own plus the other nodes' as reported."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        state = json.loads(urllib.request.urlopen(f"http://{admin}/api/state", timeout=5).read())
        if sum(b["active_connections"] + b["remote_connections"] for b in state["backends"]) == total:
            return
        time.sleep(0.02)
    raise RuntimeError(f"node {admin} never saw {total} connections")


def skew(args):
    """Node B holds long-lived connections on two of four backends; then 80 % of new arrivals reach node A.
    How evenly do the backends end up loaded, per algorithm and with or without shared counts?"""
    import urllib.request

    build()
    cases = [
        ("round_robin", "round_robin", True),
        ("least_connections, per node", "least_connections", False),
        ("least_connections, cluster-wide", "least_connections", True),
        ("power_of_two, cluster-wide", "power_of_two", True),
    ]
    out = {}
    for label, algorithm, shared in cases:
        procs = Processes()
        keep = []
        try:
            cmd = [str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen", f"{CONTROLLER_IP}:0",
                   "--admin-listen", f"{CONTROLLER_IP}:0", "--no-embedded-dataplane", "--resync-grace", "0s"]
            if not shared:
                cmd.append("--no-cluster-counts")
            _, line = procs.start(cmd, ready="READY", name="controller")
            grpc = re.search(r"grpc=(\S+)", line).group(1)
            nodes = {}
            for name, ip in (("a", "127.0.0.51"), ("b", "127.0.0.52")):
                _, ready = procs.start([str(BIN / "dataplane"), "--controller", f"http://{grpc}", "--node-id", name,
                                        "--frontend-address", ip, "--admin-listen", f"{ip}:0",
                                        "--load-report-interval", "20ms"], ready="READY")
                nodes[name] = (f"{ip}:18600", re.search(r"admin=(\S+)", ready).group(1))
            stats = []
            for i in range(4):
                ip = f"127.0.0.{61 + i}"
                _, ready = procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "http", "--listen", f"{ip}:18601",
                                        "--stats-listen", f"{ip}:0"], ready="READY")
                stats.append(re.search(r"stats=(\S+)", ready).group(1))
                procs.start([str(BIN / "agent"), "--controller", f"http://{grpc}", "--protocol", "tcp", "--port", "18600",
                             "--backend-address", ip, "--backend-port", "18601", "--check", "none",
                             "--algorithm", algorithm], ready="READY", name="agent")
            for _, admin in nodes.values():
                node_sees(admin, 0)
            # Wait until both nodes route to all four backends (a benchmark, not a test: a short settle).
            time.sleep(0.5)
            owners = [hold(nodes["b"][0], keep) for _ in range(40)]
            loaded = {f"127.0.0.63:18601", f"127.0.0.64:18601"}
            kept = []
            for sock, owner in zip(keep, owners):
                if owner in loaded:
                    kept.append(sock)
                else:
                    sock.close()
            keep[:] = kept
            if shared:
                node_sees(nodes["a"][1], len(keep))
            for i in range(40):
                node = nodes["b" if i % 5 == 4 else "a"]
                hold(node[0], keep)
                if shared:
                    for _, admin in nodes.values():
                        node_sees(admin, len(keep))
            counts = [json.loads(urllib.request.urlopen(f"http://{s}/stats", timeout=5).read())["active"] for s in stats]
            out[label] = {"counts": counts, "max_over_min": max(counts) / max(1, min(counts))}
            log(f"skew {label}: {counts}")
        finally:
            for sock in keep:
                sock.close()
            procs.stop_all()
    return out


def svg_skew(result, path):
    """Connections per backend for each case, against the ideal even split."""
    width, height, left, top = 900, 340, 60, 40
    cases = list(result)
    total = sum(result[cases[0]]["counts"])
    ideal = total / len(result[cases[0]]["counts"])
    top_value = max(max(c["counts"]) for c in result.values()) * 1.15
    plot_h = height - top - 80
    group_w = (width - left - 20) / len(cases)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-family="sans-serif" font-size="15">'
             'Connections per backend after a skewed load (dashed: the ideal even split)</text>']
    y_ideal = top + plot_h - ideal / top_value * plot_h
    for gi, label in enumerate(cases):
        gx = left + gi * group_w + 12
        for bi, count in enumerate(result[label]["counts"]):
            h = count / top_value * plot_h
            parts.append(f'<rect x="{gx + bi * 34}" y="{top + plot_h - h}" width="28" height="{h}" fill="{colors[bi % 4]}">'
                         f'<title>backend {bi + 1}: {count}</title></rect>')
            parts.append(f'<text x="{gx + bi * 34 + 14}" y="{top + plot_h - h - 4}" text-anchor="middle" '
                         f'font-family="sans-serif" font-size="11">{count}</text>')
        parts.append(f'<text x="{gx + 68}" y="{top + plot_h + 18}" text-anchor="middle" font-family="sans-serif" '
                     f'font-size="11">{label}</text>')
    parts.append(f'<line x1="{left}" y1="{y_ideal}" x2="{width - 20}" y2="{y_ideal}" stroke="#444" stroke-dasharray="6 4"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# --------------------------------------------------------------------------------------------------------
# Control plane at scale

CP_NODE_IP = "127.0.0.70"
CP_BACKEND_IP = "127.0.0.101"
CP_SIZES = {
    "full": {"services": 1000, "backends": 10, "nodes": 100, "changes": 50},
    "quick": {"services": 200, "backends": 10, "nodes": 20, "changes": 20},
}
# The controller runs with its defaults but for these: no embedded node (the simulated nodes and one real
# `dataplane` are the cluster), no warm-up, and a longer --bind-ack-timeout (default 2 s): at 1,000 x 10 to
# 100 nodes, a registration made while the other streams register too waits longer than 2 s for every
# node's ack, and the controller then answers `failed` (every node "no bind result in time"), which would
# end the run. Its per-source limits need no raising: the load driver spreads each backend address's
# registrations over Register streams of 250 backends (default caps: 64 registrations per source, 256
# backends per registration, 4,096 services).
CP_CONTROLLER_FLAGS = ["--no-embedded-dataplane", "--resync-grace", "0s", "--bind-ack-timeout", "30s"]


def build_packages(*packages):
    log(f"building {', '.join(packages)} (release)")
    cmd = ["cargo", "build", "--release", "--quiet"] + [a for p in packages for a in ("-p", p)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=1800)


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


def http_json(addr, path, timeout=5):
    import urllib.request

    return json.loads(urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout).read())


def apply_time(state):
    """The node's last snapshot apply, in ms, and the key it came from: `last_apply_us` or any numeric key
    that names an apply (with its unit suffix); (None, None) when the node does not report one."""
    scale = {"_ns": 1e-6, "_us": 1e-3, "_ms": 1.0, "_s": 1e3}
    found = []

    def walk(value, path):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{path}.{key}" if path else key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "apply" in path.rsplit(".", 1)[-1]:
            found.append((path, value))

    walk(state, "")
    found.sort(key=lambda kv: (kv[0] != "last_apply_us", kv[0]))
    for key, value in found:
        for suffix, factor in scale.items():
            if key.endswith(suffix):
                return value * factor, key
    return None, None


def control_plane(args):
    """One controller, one real `dataplane` and `loadgen control-plane` (N simulated nodes on real Sync
    streams, services x backends registered over gRPC, timed health flips). Reads the controller's CPU and
    RSS from /proc and the real node's apply time from its admin API."""
    build_packages("loadgen", "controller", "dataplane")
    size = dict(CP_SIZES["quick" if args.quick else "full"])
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    limit = 300 if args.quick else 1200
    procs = Processes()
    out = {"machine": machine(), "scenario": "control-plane", "quick": args.quick, "size": size,
           "controller_flags": CP_CONTROLLER_FLAGS}
    with tempfile.TemporaryDirectory() as tmp:
        driver_err = Path(tmp) / "loadgen.err"
        try:
            ctl, line = procs.start([str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen",
                                     f"{CONTROLLER_IP}:0", "--admin-listen", f"{CONTROLLER_IP}:0", *CP_CONTROLLER_FLAGS],
                                    ready="READY", name="controller")
            grpc = re.search(r"grpc=(\S+)", line).group(1)
            _, ready = procs.start([str(BIN / "dataplane"), "--controller", f"http://{grpc}", "--node-id", "bench-real",
                                    "--frontend-address", CP_NODE_IP, "--admin-listen", f"{CP_NODE_IP}:0"],
                                   ready="READY", name="dataplane")
            node_admin = re.search(r"admin=(\S+)", ready).group(1)
            cmd = [str(BIN / "loadgen"), "control-plane", "--controller", f"http://{grpc}",
                   "--services", str(size["services"]), "--backends", str(size["backends"]),
                   "--nodes", str(size["nodes"]), "--changes", str(size["changes"]),
                   "--backend-address", CP_BACKEND_IP, "--time-limit", f"{limit}s", "--timeout", "60s",
                   "--hold", "--json", "-"]
            log(f"control plane: {size['services']} services x {size['backends']} backends, "
                f"{size['nodes']} simulated nodes + 1 real, {size['changes']} changes")
            cpu_before, children_before = cpu_seconds(ctl.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.time()
            with open(driver_err, "w") as err:
                driver = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
            # The driver bounds itself (--time-limit); this bounds the reading of its report too.
            watchdog = threading.Timer(limit + 60, driver.kill)
            watchdog.start()
            try:
                # The report is pretty JSON: its last line is a lone `}`. The driver then holds the cluster
                # until its stdin closes, so the real node is read at the final state.
                lines = []
                for text in driver.stdout:
                    lines.append(text)
                    if text.rstrip("\n") == "}":
                        break
                if not lines or lines[-1].rstrip("\n") != "}":
                    driver.wait(timeout=30)
                    raise RuntimeError(f"loadgen control-plane failed ({driver.returncode}): "
                                       f"{driver_err.read_text().strip()[-1500:]}")
                report = json.loads("".join(lines))
                wall = time.time() - started
                out["controller"] = {"cpu_s": cpu_seconds(ctl.pid) - cpu_before, "wall_s": wall,
                                     "rss_mib": rss_mib(ctl.pid), "peak_rss_mib": peak_rss_mib(ctl.pid)}
                out["loadgen"] = report
                # The real node follows the same controller: read it once it has the final version.
                final = report["final_snapshot"]["version"]
                deadline, state = time.time() + 30, {}
                while time.time() < deadline:
                    state = http_json(node_admin, "/api/state")
                    if state.get("version", 0) >= final:
                        break
                    time.sleep(0.05)
                apply_ms, apply_key = apply_time(state)
                out["real_node"] = {"version": state.get("version"), "services": len(state.get("services", [])),
                                    "frontends": len(state.get("frontends", [])), "apply_ms": apply_ms,
                                    "apply_key": apply_key}
            finally:
                if driver.stdin:
                    driver.stdin.close()
                try:
                    driver.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    driver.kill()
                    driver.wait()
                watchdog.cancel()
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            out["loadgen_cpu_s"] = ((children_after.ru_utime + children_after.ru_stime)
                                    - (children_before.ru_utime + children_before.ru_stime))
            # The driver's own summary (its log lines aside).
            log("\n".join(l for l in driver_err.read_text().splitlines() if not re.match(r"^\S+Z\s", l)))
        finally:
            procs.stop_all()
    return out


def cp_markdown(result):
    r, size = result["loadgen"], result["size"]
    ctl, node = result["controller"], result["real_node"]
    m = result["machine"]

    def ms(v):
        return "n/a" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")

    def spread(t, keys=("p50_ms", "p99_ms", "max_ms")):
        return "n/a" if not t else " / ".join(ms(t[k]) for k in keys) + " ms"

    def verdict(value, target):
        return "" if value is None else ("met" if value < target else "missed")

    scale = f"{size['services']:,} services × {size['backends']} backends → {size['nodes']} nodes"
    first, more, change = r.get("register_first"), r.get("register_more"), r.get("change_last_ack")
    snap = r["final_snapshot"]
    rows = [
        ("register → frontend open (first backend of each service, one at a time), p50 / p99 / max",
         spread(first), "p99 < 5 ms", verdict(first and first["p99_ms"], 5)),
        ("register, other backends (every stream at once), p50 / p99 / max", spread(more), "", ""),
        (f"health change → every node ACKed ({size['changes']} flips), "
         "p50 / p99 / max", spread(change), "p99 < 50 ms", verdict(change and change["p99_ms"], 50)),
        (f"full push, {scale}: change → last ACK, p50 / max", spread(change, ("p50_ms", "max_ms")),
         "< 100 ms (1,000 × 10 → 100)",
         verdict(change and change["max_ms"], 100) if size == {**size, **CP_SIZES["full"]} else "(other size)"),
        ("node apply (real `dataplane`, last snapshot)",
         "n/a (not reported by the node)" if node["apply_ms"] is None else f"{ms(node['apply_ms'])} ms",
         "< 5 ms", verdict(node["apply_ms"], 5)),
        ("controller CPU over the run", f"{ctl['cpu_s']:.1f} s in {ctl['wall_s']:.1f} s", "", ""),
        ("controller RSS at the end / peak", f"{ctl['rss_mib']:.0f} / {ctl['peak_rss_mib']:.0f} MiB", "", ""),
        ("load driver CPU (simulated nodes and registrations)", f"{result['loadgen_cpu_s']:.1f} s", "", ""),
    ]
    out = [f"Machine: {m['nproc']} cores, {m['cpu']}, kernel {m['kernel']}. {scale} (+1 real node)"
           f"{' (quick mode)' if result['quick'] else ''}; controller flags: {' '.join(result['controller_flags'])}.",
           "", "| | measured | target | |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", f"Registration phases: first backends {r['register_first_s']:.1f} s, other backends "
                f"{r['register_more_s']:.1f} s over {r['register_streams']} Register streams; last snapshot: "
                f"version {snap['version']}, {snap['services']:,} services, {snap['backends']:,} backends, "
                f"last message (a delta once a node holds a snapshot) {snap['bytes']:,} bytes; {r['snapshots_per_node']:.0f} snapshots per node. Change: {r['change']}.",
            ""]
    if r.get("answers_with_note"):
        out += [f"{r['answers_with_note']} registration answers carried a note, e.g. {r['note_example']!r}.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Paired before/after: one data-path change, measured against the build before it

def paired(args):
    """The current build against --before DIR on the same backends: wrk rounds alternating which goes first
    (keep-alive and new connection per request), then user-space instructions per request under callgrind,
    from the difference of two runs of different lengths (so start-up and shutdown cancel out)."""
    if not args.before:
        raise SystemExit("--scenario paired needs --before DIR")
    install_peers()
    build()
    before = Path(args.before)
    rounds = args.rounds
    out = {"machine": machine(), "scenario": "paired", "rounds": rounds, "wrk": {}, "instructions": {}}
    procs = Processes()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            start_backends(procs, workdir)
            pids = {"switchboard": start_switchboard(procs).pid,
                    "switchboard-before": start_switchboard(procs, "switchboard-before", before).pid}
            for name in pids:
                wait_port(f"{PROXY_IPS[name]}:{PORTS['http']}")
            for kind, close in (("keepalive", False), ("newconn", True)):
                runs = {name: [] for name in pids}
                for r in range(rounds):
                    order = list(pids) if r % 2 == 0 else list(pids)[::-1]
                    for name in order:
                        log(f"paired {kind} round {r + 1}/{rounds}: {name}")
                        target = f"{PROXY_IPS[name]}:{PORTS['http']}"
                        runs[name].append(measure(pids[name], lambda: wrk(target, 5, close=close)))
                out["wrk"][kind] = runs
            procs.stop_all()
            procs = Processes()
            (workdir / "callgrind").mkdir()
            start_backends(procs, workdir / "callgrind")
            if shutil.which("valgrind"):
                for kind, close, (short, long) in (("keepalive", False, (500, 2500)), ("newconn", True, (300, 1300))):
                    for name, bin_dir in (("switchboard", BIN), ("switchboard-before", before)):
                        totals = [callgrind_total(bin_dir, name, n, close, workdir) for n in (short, long)]
                        out["instructions"].setdefault(kind, {})[name] = (totals[1] - totals[0]) / (long - short)
        finally:
            procs.stop_all()
    return out


def http_requests(target, n, close):
    """`n` GET /64b to `target`, on one keep-alive connection or each on its own."""
    import http.client
    host, port = target.rsplit(":", 1)
    conn = None
    for _ in range(n):
        if conn is None:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/64b", headers={"Connection": "close"} if close else {})
        conn.getresponse().read()
        if close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def callgrind_total(bin_dir, name, requests, close, workdir):
    """Instructions the controller (one worker) executes from start to exit, serving `requests` requests."""
    procs = Processes()
    out = workdir / f"callgrind-{name}-{requests}-{int(close)}.out"
    ip = PROXY_IPS[name]
    try:
        proc, line = procs.start(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(bin_dir / "controller"),
             "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen", f"{CONTROLLER_IP}:0",
             "--admin-listen", f"{CONTROLLER_IP}:0", "--frontend-address", ip, "--resync-grace", "0s",
             "--workers", "1"],
            ready="READY", name=f"{name} (callgrind)")
        grpc = re.search(r"grpc=(\S+)", line).group(1)
        bip, bport = HTTP_BACKENDS[0].rsplit(":", 1)
        procs.start([str(bin_dir / "agent"), "--controller", f"http://{grpc}", "--protocol", "tcp",
                     "--port", str(PORTS["http"]), "--backend-address", bip, "--backend-port", bport,
                     "--check", "none"], ready="READY", name="agent")
        wait_port(f"{ip}:{PORTS['http']}")
        http_requests(f"{ip}:{PORTS['http']}", requests, close)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        procs.stop_all()
    summary = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(errors="replace"), re.M)
    return int(summary.group(1))


def paired_markdown(result):
    lines = [f"{result['rounds']} rounds of 5 s per build and kind, alternating which build goes first.", "",
             "| | build | median req/s | min–max | paired median ratio | CPU µs/req | instructions/req (user space) |",
             "|---|---|---|---|---|---|---|"]
    for kind, runs in result["wrk"].items():
        now, before = runs["switchboard"], runs["switchboard-before"]
        ratio = statistics.median(a["rate"] / b["rate"] for a, b in zip(now, before))
        for name, rs in runs.items():
            rates = [r["rate"] for r in rs]
            cpu = statistics.median(r["cpu_s"] * 1e6 / r["requests"] for r in rs if r.get("requests"))
            ins = result["instructions"].get(kind, {}).get(name)
            lines.append(f"| {kind} | {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} | "
                         f"{ratio:.3f} | {cpu:.2f} | {'' if ins is None else f'{ins:,.0f}'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Replicas: registration to frontend open, through etcd and in memory

class JsonServer:
    """A server's control connection: registers, answers hellos on a thread of its own."""

    def __init__(self, addr, source):
        import socket
        import queue
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), source_address=(source, 0))
        self.replies = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                message = json.loads(line)
                if message.get("cmd") == "hello":
                    self.send({"ack": "hello"})
                else:
                    self.replies.put(message)

    def send(self, message):
        with self.lock:
            self.sock.sendall(json.dumps(message).encode() + b"\n")

    def register(self, port):
        self.send({"cmd": "register", "protocol": "tcp", "port": port, "backend_port": 9})
        return self.replies.get(timeout=30)


def open_after(addr, started, timeout=10):
    """Seconds from `started` until a TCP connect to `addr` succeeds (polled every 0.5 ms)."""
    import socket
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.05).close()
            return time.monotonic() - started
        except OSError:
            time.sleep(0.0005)
    raise RuntimeError(f"{addr} never opened")


REPLICA_IPS = {"controllers": "127.0.0.70", "node": "127.0.0.71", "servers": "127.0.0.72", "etcd": "127.0.0.73"}


def replicas(args):
    """Registration through one controller to the frontend open on a node that follows another, through
    etcd; and, for comparison, through the in-memory store (the node follows the controller registered
    with). Sequential registrations, each timed until a TCP connect to the node's new frontend succeeds."""
    if not shutil.which("etcd"):
        raise SystemExit("etcd is missing: apt-get install etcd-server")
    build(features=["controller/etcd"])
    count = 100 if args.quick else 300
    out = {"machine": machine(), "scenario": "replicas", "services": count, "runs": {}}
    for mode in ("memory", "etcd"):
        procs = Processes()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                common = ["--json-listen", f"{REPLICA_IPS['controllers']}:0", "--grpc-listen", f"{REPLICA_IPS['controllers']}:0",
                          "--admin-listen", f"{REPLICA_IPS['controllers']}:0", "--no-embedded-dataplane", "--resync-grace", "0s",
                          "--max-backends-per-registration", "1000"]
                if mode == "etcd":
                    client = f"{REPLICA_IPS['etcd']}:2379"
                    procs.start(["etcd", "--data-dir", f"{tmp}/etcd", "--listen-client-urls", f"http://{client}",
                                 "--advertise-client-urls", f"http://{client}",
                                 "--listen-peer-urls", f"http://{REPLICA_IPS['etcd']}:2380", "--log-level", "error",
                                 "--logger", "zap"])
                    wait_port(client)
                    extra = lambda i: ["--store", f"etcd://{client}", "--controller-id", f"c{i}"]
                    names = [0, 1]
                else:
                    extra = lambda i: []
                    names = [0]
                lines = [procs.start([str(BIN / "controller"), *common, *extra(i)], ready="READY", name=f"controller{i}")[1]
                         for i in names]
                json_addr = re.search(r"json=(\S+)", lines[0]).group(1)
                grpc_last = re.search(r"grpc=(\S+)", lines[-1]).group(1)
                procs.start([str(BIN / "dataplane"), "--controller", f"http://{grpc_last}", "--node-id", "bench",
                             "--frontend-address", REPLICA_IPS["node"], "--admin-listen", f"{REPLICA_IPS['node']}:0"],
                            ready="READY", name="dataplane")
                server = None
                deadline = time.time() + 15
                while server is None:
                    candidate = JsonServer(json_addr, REPLICA_IPS["servers"])
                    if candidate.register(19999).get("ack") == "successful":
                        server = candidate
                    elif time.time() > deadline:
                        raise RuntimeError("the controller never took a registration")
                    else:
                        time.sleep(0.2)
                open_after(f"{REPLICA_IPS['node']}:19999", time.monotonic())
                times = []
                for i in range(count):
                    port = 20000 + i
                    started = time.monotonic()
                    reply = server.register(port)
                    if reply.get("ack") != "successful":
                        raise RuntimeError(f"registration refused: {reply}")
                    times.append(open_after(f"{REPLICA_IPS['node']}:{port}", started) * 1000)
                log(f"replicas {mode}: {count} registrations")
                out["runs"][mode] = times
            finally:
                procs.stop_all()
    return out


def replicas_markdown(result):
    lines = [f"{result['services']} registrations, one after the other, each timed from the request to the first "
             "successful TCP connect to the new frontend on the node.", "",
             "| store | registered through | node follows | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for mode, times in result["runs"].items():
        ordered = sorted(times)
        p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        through, follows = ("controller 1", "controller 2") if mode == "etcd" else ("the controller", "the same controller")
        lines.append(f"| {mode} | {through} | {follows} | {p(0.5):.2f} | {p(0.99):.2f} | {ordered[-1]:.2f} |")
    return "\n".join(lines)


# Upgrades under load: one echo backend, one frontend per balancer.
UPGRADE_BACKEND = "127.0.0.71:17100"
UPGRADE_FRONTENDS = {"direct": UPGRADE_BACKEND, "switchboard, no upgrade": "127.0.0.72:17100",
                     "switchboard": "127.0.0.72:17100", "haproxy": "127.0.0.73:17100", "nginx": "127.0.0.74:17100"}


def upgrade(args):
    """Three upgrades in a row under steady load: two loadgen runs at once through each balancer, one opening
    a new connection per request and one keeping its connections, while the balancer is upgraded at 1/4,
    2/4 and 3/4 of the run. Switchboard: a new `dataplane --takeover` process each time (the old one hands
    over its sockets, drains and exits). HAProxy: its master-worker reload (SIGUSR2: the master re-executes
    itself and the new worker takes the listeners over the stats socket, `expose-fd listeners`). nginx: its
    reload (SIGHUP: new workers, the old ones finish their connections). `direct` is the backend without a
    balancer and without upgrades, `switchboard, no upgrade` the same node never upgraded: the longest gap of
    a run where nothing happens. Reported per run:
    requests answered, errors, and the longest time without any answer; medians over interleaved
    repetitions."""
    build()
    install_peers()
    seconds = 4 if args.quick else 8
    reps = 1 if args.quick else (args.reps or 3)

    def run_one(procs, setup, workdir):
        procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "tcp-echo", "--listen", UPGRADE_BACKEND],
                    ready="READY")
        upgrade_once = start_upgrade_setup(procs, setup, workdir)
        run = drive_upgrades(UPGRADE_FRONTENDS[setup], seconds, upgrade_once)
        if setup == "switchboard":
            # The old nodes exit by themselves once the keep-alive connections have ended.
            olds = [p for p in procs.procs if p.name == "dataplane"][:-1]
            run["old_exited"] = sum(wait_exit(p, 20) == 0 for p in olds)
        return run

    describe = lambda run: ", ".join(f"{kind} {r['ok']} ok {r['errors']} errors gap {r['longest_gap_ms']:.1f} ms"
                                     for kind, r in run["loads"].items())
    runs = interleaved("upgrade", list(UPGRADE_FRONTENDS), reps, run_one, describe)
    summary = {}
    for setup, rs in runs.items():
        summary[setup] = {kind: {"ok": statistics.median(r["loads"][kind]["ok"] for r in rs),
                                 "errors": sum(r["loads"][kind]["errors"] for r in rs),
                                 "longest_gap_ms": statistics.median(r["loads"][kind]["longest_gap_ms"] for r in rs)}
                          for kind in ("new connection per request", "keep-alive")}
        upgrades = [t for r in rs for t in r["upgrade_s"]]
        if upgrades:
            summary[setup]["upgrade_s"] = statistics.median(upgrades)
    return {"machine": machine(), "scenario": "upgrade", "seconds": seconds, "upgrades": 3, "reps": reps,
            "runs": runs, "summary": summary}


def wait_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def start_upgrade_setup(procs, setup, workdir):
    """Starts `setup` in front of the upgrade backend; returns what upgrades it once (none for direct)."""
    frontend = UPGRADE_FRONTENDS[setup]
    fip, port = frontend.rsplit(":", 1)
    bip, bport = UPGRADE_BACKEND.rsplit(":", 1)
    if setup == "direct":
        upgrade_once = None
    elif setup.startswith("switchboard"):
        _, line = procs.start([str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen",
                               f"{CONTROLLER_IP}:0", "--admin-listen", f"{CONTROLLER_IP}:0", "--no-embedded-dataplane",
                               "--resync-grace", "0s"], ready="READY", name="controller")
        grpc = re.search(r"grpc=(\S+)", line).group(1)
        procs.start([str(BIN / "agent"), "--controller", f"http://{grpc}", "--protocol", "tcp", "--port", port,
                     "--backend-address", bip, "--backend-port", bport, "--check", "none"], ready="READY")
        socket_path = workdir / "node.sock"
        node = [str(BIN / "dataplane"), "--controller", f"http://{grpc}", "--node-id", "bench", "--frontend-address", fip,
                "--admin-listen", f"{fip}:0", "--takeover", str(socket_path), "--drain-timeout", "60s"]
        procs.start(node, ready="READY", name="dataplane")

        def upgrade_once():
            # READY: the new node accepts on the old one's sockets, and the old one has stopped accepting.
            procs.start(node, ready="READY", name="dataplane")
        if setup != "switchboard":
            upgrade_once = None
    elif setup == "haproxy":
        conf = workdir / "upgrade-haproxy.cfg"
        conf.write_text(f"""
global
  stats socket {workdir}/haproxy.sock mode 600 level admin expose-fd listeners
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind {frontend}
  default_backend be
backend be
  server s0 {UPGRADE_BACKEND}
""")
        master, _ = procs.start(["haproxy", "-W", "-db", "-f", str(conf)], name="haproxy")

        def upgrade_once():
            os.kill(master.pid, signal.SIGUSR2)
    else:
        master = start_nginx(procs, workdir, "upgrade-nginx",
                             f"  server {{ listen {frontend} backlog=4096; proxy_pass {UPGRADE_BACKEND}; }}",
                             connections=4096)

        def upgrade_once():
            os.kill(master.pid, signal.SIGHUP)
    wait_port(frontend)
    return upgrade_once


def drive_upgrades(frontend, seconds, upgrade_once):
    """Both loads through `frontend` for `seconds`, upgrading at 1/4, 2/4 and 3/4 of the run."""
    common = ["tcp", "--target", frontend, "--connections", "4", "--timeout", "5s"]
    loads = {"new connection per request": common, "keep-alive": [*common, "--keepalive"]}
    results = {}
    threads = [threading.Thread(target=lambda k=k, a=a: results.__setitem__(k, loadgen(a, seconds))) for k, a in loads.items()]
    started = time.time()
    for thread in threads:
        thread.start()
    upgraded = []
    if upgrade_once:
        for quarter in (1, 2, 3):
            time.sleep(max(0.0, started + seconds * quarter / 4 - time.time()))
            began = time.time()
            upgrade_once()
            upgraded.append(round(time.time() - began, 3))
    for thread in threads:
        thread.join()
    return {"upgrade_s": upgraded, "loads": {kind: {"ok": r["ok"], "errors": sum(r["errors"].values()), "by_kind": r["errors"],
                                                     "longest_gap_ms": r["longest_gap_ms"] or 0.0}
                                              for kind, r in results.items()}}


def upgrade_markdown(result):
    rows = ["| balancer | load | requests (median) | errors (all runs) | longest gap (median) |", "|---|---|---|---|---|"]
    for setup, kinds in result["summary"].items():
        for kind, s in kinds.items():
            if kind == "upgrade_s":
                continue
            rows.append(f"| {setup} | {kind} | {s['ok']:,.0f} | {s['errors']} | {s['longest_gap_ms']:.1f} ms |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short repetition (under 3 minutes)")
    parser.add_argument("--reps", type=int, help="repetitions of the suite (default 3; 1 with --quick)")
    parser.add_argument("--levers", action="store_true",
                        help="also run Switchboard with one lever off each (--workers 1, --splice-pipes 0)")
    parser.add_argument("--before", metavar="DIR",
                        help="with --levers: a directory with an earlier build's controller and agent, run as switchboard-before")
    parser.add_argument("--variants", metavar="NAMES",
                        help="with --levers: only these lever variants, comma-separated ('' for none: just --before)")
    parser.add_argument("--scenario", choices=["suite", "pydirector", "skew", "control-plane", "paired", "replicas", "tasks",
                                                   "upgrade"],
                        default="suite")
    parser.add_argument("--rounds", type=int, default=10, help="paired: wrk rounds per build and kind")
    parser.add_argument("--cpu", choices=["emulated", "real"], default="emulated",
                        help="tasks: backends with an emulated core each (default), or burning this machine's CPU")
    for key in ("services", "backends", "nodes", "changes"):
        parser.add_argument(f"--{key}", type=int, help=f"control-plane: {key} (overrides the size of the run)")
    args = parser.parse_args()
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    as_json = lambda result: json.dumps(result, indent=2)
    scenarios = {"skew": (skew, as_json), "control-plane": (control_plane, cp_markdown),
                 "replicas": (replicas, replicas_markdown), "paired": (paired, paired_markdown),
                 "pydirector": (pydirector, as_json), "tasks": (tasks, tasks_markdown),
                 "upgrade": (upgrade, upgrade_markdown)}
    if args.scenario in scenarios:
        run_scenario, render = scenarios[args.scenario]
        result = run_scenario(args)
        (RESULTS / f"{args.scenario}-{stamp}.json").write_text(json.dumps(result, indent=2))
        if args.scenario == "skew":
            svg_skew(result, RESULTS / "skew.svg")
        print(render(result))
        return
    results = suite(args)
    (RESULTS / f"suite-{stamp}.json").write_text(json.dumps(results, indent=2))
    svg_bars(results, RESULTS / "ratios.svg")
    print(markdown(results))


if __name__ == "__main__":
    main()
