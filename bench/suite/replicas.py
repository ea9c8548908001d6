"""`--scenario replicas`: registration through one controller to the frontend open on a node that follows
another, through etcd; and the same through the in-memory store, for comparison."""

import json
import re
import shutil
import tempfile
import threading
import time

from .host import BIN, build, log, machine
from .processes import Processes, wait_port


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
