#!/usr/bin/env python3
"""How many source addresses it takes to hold a door of the controller shut.

    python3 bench/doors.py [--nofile 1024] [--mode silent|slow|streams] [--door grpc,admin,json]

For each door (gRPC, admin HTTP, JSON channel) and for 1, 2, 4, ... --max-sources source addresses (each in
a /24 of its own: 127.100.0.7, 127.100.1.7, ...), a release controller is started (under --nofile when
given), each source opens its share of a quarter more connections than the door holds, and a newcomer
from 127.0.0.1 then tries the door three times: a gRPC connection must get the server's HTTP/2 SETTINGS,
an admin one `GET /api/state` 200, a JSON one an answer to `{"cmd":"hello"}`. The door is held when all
three fail. Modes: `silent` connections send nothing, `slow` ones send one byte of a request every second,
`streams` (gRPC only) open a `Registry.Register` stream each and never send its first message (requests
in flight: the worst case), answering the controller's PINGs. A door found held is tried again every 0.5 s
for up to 30 s, and `held_for_seconds` says when the newcomer got in. Prints one JSON object per door. Everything
runs on 127.0.0.0/8 and stops by itself.
"""

import argparse
import json
import re
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SLOW = {"grpc": PREFACE, "admin": b"GET /api/state HTTP/1.1\r\nHost: x\r\nX-Slow: ", "json": b'{"cmd":"register","port":'}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def register_headers(authority):
    # HPACK literals without indexing, names and values as they are (no Huffman).
    block = b""
    for name, value in [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/switchboard.v1.Registry/Register"),
                        (b":authority", authority.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers")]:
        block += b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    return PREFACE + frame(4, 0, 0) + frame(1, 4, 1, block)


class Controller:
    def __init__(self, nofile):
        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        args = [str(BIN / "controller"), "--json-listen", "127.0.0.70:0", "--grpc-listen", "127.0.0.70:0",
                "--admin-listen", "127.0.0.70:0", "--frontend-address", "127.0.0.71", "--resync-grace", "0s"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=limit, start_new_session=True)
        self.shares = {}
        ready = self.proc.stdout.readline()
        self.addrs = {k: (h, int(p)) for k, h, p in re.findall(r"(\w+)=([\d.]+):(\d+)", ready)}
        threading.Thread(target=self._stderr, daemon=True).start()
        deadline = time.time() + 10
        while "grpc" not in self.shares and time.time() < deadline:
            time.sleep(0.05)

    def _stderr(self):
        for line in self.proc.stderr:
            if "file descriptors" in line:
                self.shares = {k: int(v) for k, v in re.findall(r"\b(json|grpc|admin)=(\d+)", line)}

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def newcomer_gets_in(door, addr):
    try:
        s = socket.create_connection(addr, timeout=2, source_address=("127.0.0.1", 0))
        s.settimeout(2)
        if door == "grpc":
            s.sendall(PREFACE + frame(4, 0, 0))
            ok = len(s.recv(9)) == 9
        elif door == "admin":
            s.sendall(b"GET /api/state HTTP/1.0\r\nHost: x\r\n\r\n")
            ok = b" 200 " in s.recv(64).split(b"\r\n")[0]
        else:
            s.sendall(b'{"cmd":"hello"}\n')
            ok = b'"hello"' in s.recv(200)
        s.close()
        return ok
    except OSError:
        return False


def hold(door, addr, sources, per_source, mode):
    """Opens the connections; returns them and a stop event for their keeper thread."""
    conns = []
    for i in range(per_source):
        for source in sources:
            try:
                s = socket.create_connection(addr, timeout=2, source_address=(source, 0))
                if mode == "streams":
                    s.sendall(register_headers(f"{addr[0]}:{addr[1]}"))
                s.setblocking(False)
                conns.append(s)
            except OSError:
                pass
    stop = threading.Event()

    def keep():
        sel = selectors.DefaultSelector()
        for s in conns:
            sel.register(s, selectors.EVENT_READ)
        sent, last = 0, 0.0
        while not stop.is_set():
            if mode == "slow" and time.time() - last >= 1 and sent < len(SLOW[door]):
                for s in conns:
                    try:
                        s.send(SLOW[door][sent:sent + 1])
                    except OSError:
                        pass
                sent, last = sent + 1, time.time()
            for key, _ in sel.select(0.2):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if mode == "streams":
                    # Answer every SETTINGS and PING, as a live client would (a coarse parse: frames whole).
                    while len(data) >= 9:
                        length, kind, flags = int.from_bytes(data[:3], "big"), data[3], data[4]
                        payload = data[9:9 + length]
                        try:
                            if kind == 4 and not flags & 1:
                                key.fileobj.send(frame(4, 1, 0))
                            elif kind == 6 and not flags & 1:
                                key.fileobj.send(frame(6, 1, 0, payload))
                        except OSError:
                            break
                        data = data[9 + length:]
        sel.close()

    threading.Thread(target=keep, daemon=True).start()
    return conns, stop


def probe(door, args):
    result = {"door": door, "mode": args.mode, "nofile": args.nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[1]}
    k = 1
    while k <= args.max_sources:
        ctl = Controller(args.nofile)
        try:
            size = ctl.shares.get(door, 0)
            result["door_size"] = size
            sources = [f"127.{100 + i // 250}.{i % 250}.7" for i in range(k)]
            per_source = max(1, -(-(size * 5 // 4) // k))
            conns, stop = hold(door, ctl.addrs[door], sources, per_source, args.mode)
            time.sleep(0.5)
            opened = time.time()
            held = not any(newcomer_gets_in(door, ctl.addrs[door]) or time.sleep(0.5) for _ in range(3))
            log(f"{door} {args.mode}: {k} sources x {per_source} = {len(conns)} connections: "
                f"{'held' if held else 'open'}")
            if held:
                # For how long: the newcomer keeps trying (every 0.5 s, at most 30 s) while the
                # connections stay open and keep answering PINGs.
                while time.time() - opened < 30 and not newcomer_gets_in(door, ctl.addrs[door]):
                    time.sleep(0.5)
                if time.time() - opened < 30:
                    result["held_for_seconds"] = round(time.time() - opened, 1)
                log(f"{door} {args.mode}: held for {result.get('held_for_seconds', 'over 30')} s")
            stop.set()
            for s in conns:
                s.close()
        finally:
            ctl.stop()
        if held:
            result["sources_to_hold"] = k
            return result
        k *= 2
    result["sources_to_hold"] = None
    result["not_held_up_to"] = args.max_sources
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nofile", type=int, help="the controller's descriptor limit (default: this shell's)")
    parser.add_argument("--mode", choices=["silent", "slow", "streams"], default="silent")
    parser.add_argument("--door", default="grpc,admin,json")
    parser.add_argument("--max-sources", type=int, default=256)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    if not (BIN / "controller").exists():
        subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=ROOT, check=True, timeout=1800)
    for door in args.door.split(","):
        if args.mode == "streams" and door != "grpc":
            continue
        print(json.dumps(probe(door, args)), flush=True)


if __name__ == "__main__":
    main()
