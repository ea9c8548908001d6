"""`--scenario paired --before DIR`: this build against an earlier one on the same backends: wrk rounds
alternating which build goes first, then user-space instructions per request under callgrind."""

import re
import shutil
import signal
import statistics
import tempfile
from pathlib import Path

from .host import BIN, build, install_peers, log, machine
from .load import wrk
from .peers import CONTROLLER_IP, HTTP_BACKENDS, PORTS, PROXY_IPS, start_backends, start_switchboard
from .processes import Processes, measure, wait_port


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
