#!/usr/bin/env python3
"""A backend of the `tasks` benchmark: CPU-bound tasks over HTTP, the container balancer's workload.

    python3 bench/taskserver.py ADDR [--hog] [--emulate]

`GET /task?ms=N` burns N ms of CPU time in this process (one thread per request, all under one
interpreter lock: the process is one "container" of about one core) and answers when done. `GET /load`
answers this process's CPU use over the last second as a fraction of one core (what an agent's
`--load-command` reports). `--hog` adds a thread that burns CPU forever: a noisy neighbour inside the
container, which slows its tasks and shows in its load. Prints `READY` once listening; only loopback.

`--emulate`: a container with one core of its own, for machines with fewer cores than backends (four
CPU-bound processes on two cores slow each other, whatever the balancer). One task runs at a time and
holds the core for N ms (2N with the hog, which takes half of it); the others wait their turn. The load is
the share of the last second the core was busy (1.0 with the hog, which keeps it busy) plus the tasks
waiting.
"""

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

samples = []  # (wall, cpu) pairs of the last seconds
lock = threading.Lock()
EMULATE = "--emulate" in sys.argv
HOG = "--hog" in sys.argv
core = threading.Lock()  # the emulated container's one core
busy = []  # (start, end) of emulated tasks in the last seconds
waiting = [0]


def burn(seconds):
    """Spends `seconds` of this thread's CPU time."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        for _ in range(2000):
            x += 1
    return x


def sampler():
    while True:
        with lock:
            samples.append((time.monotonic(), time.process_time()))
            del samples[:-20]
        time.sleep(0.1)


def emulated_task(seconds):
    with lock:
        waiting[0] += 1
    with core:
        with lock:
            waiting[0] -= 1
        start = time.monotonic()
        time.sleep(seconds * (2 if HOG else 1))
        with lock:
            busy.append((start, time.monotonic()))
            del busy[:-200]


def emulated_load():
    now = time.monotonic()
    with lock:
        used = sum(max(0.0, end - max(start, now - 1.0)) for start, end in busy)
        queued = waiting[0]
    running = 1.0 if core.locked() else 0.0
    share = 1.0 if HOG else min(1.0, max(used, running * 0.5))
    return share + queued


def load():
    if EMULATE:
        return emulated_load()
    with lock:
        if len(samples) < 2:
            return 0.0
        now = samples[-1]
        past = next((s for s in samples if now[0] - s[0] <= 1.0), samples[0])
    wall = now[0] - past[0]
    return (now[1] - past[1]) / wall if wall > 0 else 0.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/task":
            ms = min(int(parse_qs(url.query).get("ms", ["100"])[0]), 60_000)
            if EMULATE:
                emulated_task(ms / 1000)
            else:
                burn(ms / 1000)
            body = f"done {ms}\n".encode()
        elif url.path == "/load":
            body = f"{load():.3f}\n".encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    if not host.startswith("127."):
        sys.exit("taskserver: loopback addresses only")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=sampler, daemon=True).start()
    if HOG and not EMULATE:
        threading.Thread(target=lambda: burn(1e9), daemon=True).start()
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
