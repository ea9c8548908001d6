"""`--scenario upgrade`: three upgrades under load, Switchboard's `--takeover`, HAProxy's master-worker
reload and nginx's reload, with the backend direct and a never-upgraded Switchboard for the noise floor:
requests answered, errors and the longest gap."""

import os
import re
import signal
import statistics
import threading
import time

from .host import BIN, build, install_peers, machine
from .load import loadgen
from .peers import CONTROLLER_IP, start_nginx
from .processes import interleaved, wait_exit, wait_port

# Upgrades under load: one echo backend, one frontend per balancer.
UPGRADE_BACKEND = "127.0.0.71:17100"
UPGRADE_FRONTENDS = {"direct": UPGRADE_BACKEND, "switchboard, no upgrade": "127.0.0.72:17100",
                     "switchboard": "127.0.0.72:17100", "haproxy": "127.0.0.73:17100", "nginx": "127.0.0.74:17100"}


def upgrade(args):
    """Three upgrades in a row under steady load: two loadgen runs at once through each balancer, one opening
    a new connection per request and one keeping its connections, while the balancer is upgraded at 1/4,
    2/4 and 3/4 of the run. Switchboard: a new `dataplane --takeover` process each time (the old one hands
    over its sockets, drains and exits). HAProxy: its master-worker reload (SIGUSR2: the master re-executes
    itself and the new worker takes the listeners over the stats socket, `expose-fd listeners`). nginx: its
    reload (SIGHUP: new workers, the old ones finish their connections). `direct` is the backend without a
    balancer and without upgrades, `switchboard, no upgrade` the same node never upgraded: the longest gap of
    a run where nothing happens. Reported per run:
    requests answered, errors, and the longest time without any answer; medians over interleaved
    repetitions."""
    build()
    install_peers()
    seconds = 4 if args.quick else 8
    reps = 1 if args.quick else (args.reps or 3)

    def run_one(procs, setup, workdir):
        procs.start([str(BIN / "loadgen"), "--threads", "1", "serve", "tcp-echo", "--listen", UPGRADE_BACKEND],
                    ready="READY")
        upgrade_once = start_upgrade_setup(procs, setup, workdir)
        run = drive_upgrades(UPGRADE_FRONTENDS[setup], seconds, upgrade_once)
        if setup == "switchboard":
            # The old nodes exit by themselves once the keep-alive connections have ended.
            olds = [p for p in procs.procs if p.name == "dataplane"][:-1]
            run["old_exited"] = sum(wait_exit(p, 20) == 0 for p in olds)
        return run

    describe = lambda run: ", ".join(f"{kind} {r['ok']} ok {r['errors']} errors gap {r['longest_gap_ms']:.1f} ms"
                                     for kind, r in run["loads"].items())
    runs = interleaved("upgrade", list(UPGRADE_FRONTENDS), reps, run_one, describe)
    summary = {}
    for setup, rs in runs.items():
        summary[setup] = {kind: {"ok": statistics.median(r["loads"][kind]["ok"] for r in rs),
                                 "errors": sum(r["loads"][kind]["errors"] for r in rs),
                                 "longest_gap_ms": statistics.median(r["loads"][kind]["longest_gap_ms"] for r in rs)}
                          for kind in ("new connection per request", "keep-alive")}
        upgrades = [t for r in rs for t in r["upgrade_s"]]
        if upgrades:
            summary[setup]["upgrade_s"] = statistics.median(upgrades)
    return {"machine": machine(), "scenario": "upgrade", "seconds": seconds, "upgrades": 3, "reps": reps,
            "runs": runs, "summary": summary}


def start_upgrade_setup(procs, setup, workdir):
    """Starts `setup` in front of the upgrade backend; returns what upgrades it once (none for direct)."""
    frontend = UPGRADE_FRONTENDS[setup]
    fip, port = frontend.rsplit(":", 1)
    bip, bport = UPGRADE_BACKEND.rsplit(":", 1)
    if setup == "direct":
        upgrade_once = None
    elif setup.startswith("switchboard"):
        _, line = procs.start([str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen",
                               f"{CONTROLLER_IP}:0", "--admin-listen", f"{CONTROLLER_IP}:0", "--no-embedded-dataplane",
                               "--resync-grace", "0s"], ready="READY", name="controller")
        grpc = re.search(r"grpc=(\S+)", line).group(1)
        procs.start([str(BIN / "agent"), "--controller", f"http://{grpc}", "--protocol", "tcp", "--port", port,
                     "--backend-address", bip, "--backend-port", bport, "--check", "none"], ready="READY")
        socket_path = workdir / "node.sock"
        node = [str(BIN / "dataplane"), "--controller", f"http://{grpc}", "--node-id", "bench", "--frontend-address", fip,
                "--admin-listen", f"{fip}:0", "--takeover", str(socket_path), "--drain-timeout", "60s"]
        procs.start(node, ready="READY", name="dataplane")

        def upgrade_once():
            # READY: the new node accepts on the old one's sockets, and the old one has stopped accepting.
            procs.start(node, ready="READY", name="dataplane")
        if setup != "switchboard":
            upgrade_once = None
    elif setup == "haproxy":
        conf = workdir / "upgrade-haproxy.cfg"
        conf.write_text(f"""
global
  stats socket {workdir}/haproxy.sock mode 600 level admin expose-fd listeners
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind {frontend}
  default_backend be
backend be
  server s0 {UPGRADE_BACKEND}
""")
        master, _ = procs.start(["haproxy", "-W", "-db", "-f", str(conf)], name="haproxy")

        def upgrade_once():
            os.kill(master.pid, signal.SIGUSR2)
    else:
        master = start_nginx(procs, workdir, "upgrade-nginx",
                             f"  server {{ listen {frontend} backlog=4096; proxy_pass {UPGRADE_BACKEND}; }}",
                             connections=4096)

        def upgrade_once():
            os.kill(master.pid, signal.SIGHUP)
    wait_port(frontend)
    return upgrade_once


def drive_upgrades(frontend, seconds, upgrade_once):
    """Both loads through `frontend` for `seconds`, upgrading at 1/4, 2/4 and 3/4 of the run."""
    common = ["tcp", "--target", frontend, "--connections", "4", "--timeout", "5s"]
    loads = {"new connection per request": common, "keep-alive": [*common, "--keepalive"]}
    results = {}
    threads = [threading.Thread(target=lambda k=k, a=a: results.__setitem__(k, loadgen(a, seconds))) for k, a in loads.items()]
    started = time.time()
    for thread in threads:
        thread.start()
    upgraded = []
    if upgrade_once:
        for quarter in (1, 2, 3):
            time.sleep(max(0.0, started + seconds * quarter / 4 - time.time()))
            began = time.time()
            upgrade_once()
            upgraded.append(round(time.time() - began, 3))
    for thread in threads:
        thread.join()
    return {"upgrade_s": upgraded, "loads": {kind: {"ok": r["ok"], "errors": sum(r["errors"].values()), "by_kind": r["errors"],
                                                     "longest_gap_ms": r["longest_gap_ms"] or 0.0}
                                              for kind, r in results.items()}}


def upgrade_markdown(result):
    rows = ["| balancer | load | requests (median) | errors (all runs) | longest gap (median) |", "|---|---|---|---|---|"]
    for setup, kinds in result["summary"].items():
        for kind, s in kinds.items():
            if kind == "upgrade_s":
                continue
            rows.append(f"| {setup} | {kind} | {s['ok']:,.0f} | {s['errors']} | {s['longest_gap_ms']:.1f} ms |")
    return "\n".join(rows)
