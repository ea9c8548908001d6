"""Load drivers: wrk (HTTP), iperf3 (bulk), loadgen (UDP, HTTP at a fixed rate, TCP), each run bounded
in time; a run where most requests failed is refused as a broken set-up rather than reported."""

import json
import re
import subprocess

from .host import BIN, log, run
from .peers import IPERF_BACKEND
from .processes import wait_listening


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
