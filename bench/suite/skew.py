"""`--scenario skew`: two nodes, four backends; node B holds long-lived connections on two of them, then
80 % of new arrivals reach node A. How evenly the backends end up loaded, per algorithm, with the
cluster-wide counts shared or not."""

import json
import re
import time

from .host import BIN, build, log
from .peers import CONTROLLER_IP
from .processes import Processes


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
