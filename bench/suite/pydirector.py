"""`--scenario pydirector`: two nodes in front of 1, 2 and 4 CPU-bound backends, driven from 25 % to
125 % of their capacity: where each setup saturates."""

import re
import time

from .host import BIN, build, log
from .load import loadgen
from .peers import CONTROLLER_IP
from .processes import Processes


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
