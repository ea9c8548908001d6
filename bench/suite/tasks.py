"""`--scenario tasks`: CPU-bound tasks on four backends (bench/taskserver.py), the last one hogged, behind
Switchboard's round_robin, least_connections and least_load, HAProxy's leastconn and nginx's least_conn:
task completion times."""

import re
import statistics
import sys
import threading
import time

from .host import BIN, ROOT, build, install_peers, machine
from .peers import CONTROLLER_IP, start_nginx
from .processes import http_json, interleaved, wait_port
from .report import percentile

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
