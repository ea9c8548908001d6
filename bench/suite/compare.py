"""`--scenario suite` (the default): direct-to-backend, Switchboard, HAProxy (also with one thread) and
nginx `stream`, with `--levers` Switchboard's lever variants and `--before` an earlier build. Per
repetition, in a rotating order: bulk (iperf3, 1 and 4 streams), a new connection per request and
keep-alive (wrk), UDP (loadgen); then latency at a fixed rate, and the memory each proxy takes to hold
the same idle connections."""

import json
import tempfile
import time
from pathlib import Path

from .host import build, install_peers, log, machine
from .load import checked, iperf, latency_at, loadgen, udp_rate, wrk
from .peers import (HTTP_BACKENDS, IDLE_CONNECTIONS, IDLE_STATS, IPERF_BACKEND, PEERS_AND_US, PORTS, PROXY_IPS,
                    UDP_BACKENDS, VARIANT_FLAGS, start_backends, start_haproxy, start_nginx_stream, start_switchboard)
from .processes import Processes, measure, rss_mib, wait_port


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
