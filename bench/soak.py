#!/usr/bin/env python3
"""Switchboard soak scenarios: what a long run and a flood of clients leave behind.

    python3 bench/soak.py churn [--seconds 60] [--servers 50]   # servers churn (and hang) under load
    python3 bench/soak.py udp-memory [--sessions 50000]         # RSS before, at the peak, and after reaping

`churn` runs the end-to-end churn test in release mode for its long form and prints its figures. `udp-memory`
starts a release controller, a UDP echo backend and opens SESSIONS sessions from distinct client ports, one
after another, then waits for every session to be reaped. Everything runs on 127.0.0.0/8 and stops by itself.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def churn(args):
    env = dict(os.environ, SWITCHBOARD_SOAK_SECS=str(args.seconds), SWITCHBOARD_SOAK_SERVERS=str(args.servers),
               SWITCHBOARD_SOAK_HANGS="1")
    cmd = ["cargo", "test", "--release", "-q", "-p", "switchboard-tests", "--test", "e2e", "soak", "--", "--nocapture"]
    log("running:", " ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.seconds + 900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("SOAK ")), None)
    if line is None:
        sys.exit(f"no SOAK line:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    figures = json.loads(line[5:])
    print(json.dumps(figures, indent=2))
    return figures


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def udp_memory(args):
    controller = Path(args.controller or BIN / "controller")
    if not args.controller:
        subprocess.run(["cargo", "build", "--release", "-q", "--bins"], cwd=ROOT, check=True, timeout=1800)
    procs = []
    try:
        echo = subprocess.Popen([str(BIN / "loadgen"), "--threads", "1", "serve", "udp-echo", "--listen", "127.0.0.61:9500"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        procs.append(echo)
        echo.stdout.readline()
        ctl = subprocess.Popen([str(controller), "--json-listen", "127.0.0.60:0", "--grpc-listen", "127.0.0.60:0",
                                "--admin-listen", "127.0.0.60:0", "--frontend-address", "127.0.0.62", "--resync-grace", "0s",
                                "--udp-max-sessions", "65536", "--udp-idle-timeout", "2s"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        procs.append(ctl)
        ready = ctl.stdout.readline()
        json_addr = re.search(r"json=(\S+)", ready).group(1)
        host, port = json_addr.rsplit(":", 1)
        control = socket.create_connection((host, int(port)), source_address=("127.0.0.61", 0))
        control.sendall(b'{"cmd":"register","protocol":"udp","port":9500}\n')
        reply = control.recv(1000)
        assert b"successful" in reply, reply

        def answer_hellos():
            # The server stays registered only while it answers the controller's hellos.
            for line in control.makefile("rb"):
                if b"hello" in line:
                    control.sendall(b'{"ack":"hello"}\n')

        threading.Thread(target=answer_hellos, daemon=True).start()
        frontend = ("127.0.0.62", 9500)
        # Warm-up: the first sessions allocate the runtime's steady state.
        client = iter(range(10**9))

        def sessions(n):
            answered = 0
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(0.3)
                # Every session its own client address (127.0.2.1 onwards, one port outside the ephemeral
                # range), so no address comes back while its session lives.
                k = next(client)
                s.bind((f"127.0.{2 + k // 250 % 250}.{1 + k % 250}", 20000))
                try:
                    s.sendto(b"x" * 64, frontend)
                    s.recvfrom(2048)
                    answered += 1
                except OSError:
                    pass
                s.close()
            return answered
        sessions(1000)
        time.sleep(4)
        baseline = rss_kb(ctl.pid)
        started = time.time()
        answered = 0
        peak = baseline
        # Rounds of 5,000 new sessions, each round reaped (2 s idle timeout) before the next.
        for _ in range(args.sessions // 5000):
            answered += sessions(5000)
            peak = max(peak, rss_kb(ctl.pid))
            time.sleep(3)
            log(f"{answered} answered, rss {rss_kb(ctl.pid)} kB")
        elapsed = time.time() - started
        # Every session idles out after 2 s; the reaper runs on the next datagram or timer.
        time.sleep(6)
        after = rss_kb(ctl.pid)
        figures = {"controller": str(controller), "sessions": args.sessions, "answered": answered,
                   "seconds": round(elapsed, 1), "rss_kb_baseline": baseline, "rss_kb_peak": peak, "rss_kb_after": after}
        print(json.dumps(figures, indent=2))
        return figures
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    c = sub.add_parser("churn")
    c.add_argument("--seconds", type=int, default=60)
    c.add_argument("--servers", type=int, default=50)
    u = sub.add_parser("udp-memory")
    u.add_argument("--sessions", type=int, default=50000)
    u.add_argument("--controller", help="a controller binary to measure instead of this tree's release build")
    args = parser.parse_args()
    {"churn": churn, "udp-memory": udp_memory}[args.scenario](args)


if __name__ == "__main__":
    main()
