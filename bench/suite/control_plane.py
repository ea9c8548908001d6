"""`--scenario control-plane`: the controller at scale. One controller, one real `dataplane` and `loadgen
control-plane` (simulated nodes on real Sync streams, services x backends registered over gRPC, timed
health flips); the controller's CPU and RSS, the real node's apply time."""

import json
import re
import resource
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .host import BIN, build_packages, log, machine
from .peers import CONTROLLER_IP
from .processes import Processes, cpu_seconds, http_json, peak_rss_mib, rss_mib

CP_NODE_IP = "127.0.0.70"
CP_BACKEND_IP = "127.0.0.101"
CP_SIZES = {
    "full": {"services": 1000, "backends": 10, "nodes": 100, "changes": 50},
    "quick": {"services": 200, "backends": 10, "nodes": 20, "changes": 20},
}
# The controller runs with its defaults but for these: no embedded node (the simulated nodes and one real
# `dataplane` are the cluster), no warm-up, and a longer --bind-ack-timeout (default 2 s): at 1,000 x 10 to
# 100 nodes, a registration made while the other streams register too waits longer than 2 s for every
# node's ack, and the controller then answers `failed` (every node "no bind result in time"), which would
# end the run. Its per-source limits need no raising: the load driver spreads each backend address's
# registrations over Register streams of 250 backends (default caps: 64 registrations per source, 256
# backends per registration, 4,096 services).
CP_CONTROLLER_FLAGS = ["--no-embedded-dataplane", "--resync-grace", "0s", "--bind-ack-timeout", "30s"]


def apply_time(state):
    """The node's last snapshot apply, in ms, and the key it came from: `last_apply_us` or any numeric key
    that names an apply (with its unit suffix); (None, None) when the node does not report one."""
    scale = {"_ns": 1e-6, "_us": 1e-3, "_ms": 1.0, "_s": 1e3}
    found = []

    def walk(value, path):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{path}.{key}" if path else key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "apply" in path.rsplit(".", 1)[-1]:
            found.append((path, value))

    walk(state, "")
    found.sort(key=lambda kv: (kv[0] != "last_apply_us", kv[0]))
    for key, value in found:
        for suffix, factor in scale.items():
            if key.endswith(suffix):
                return value * factor, key
    return None, None


def control_plane(args):
    """One controller, one real `dataplane` and `loadgen control-plane` (N simulated nodes on real Sync
    streams, services x backends registered over gRPC, timed health flips). Reads the controller's CPU and
    RSS from /proc and the real node's apply time from its admin API."""
    build_packages("loadgen", "controller", "dataplane")
    size = dict(CP_SIZES["quick" if args.quick else "full"])
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    limit = 300 if args.quick else 1200
    procs = Processes()
    out = {"machine": machine(), "scenario": "control-plane", "quick": args.quick, "size": size,
           "controller_flags": CP_CONTROLLER_FLAGS}
    with tempfile.TemporaryDirectory() as tmp:
        driver_err = Path(tmp) / "loadgen.err"
        try:
            ctl, line = procs.start([str(BIN / "controller"), "--json-listen", f"{CONTROLLER_IP}:0", "--grpc-listen",
                                     f"{CONTROLLER_IP}:0", "--admin-listen", f"{CONTROLLER_IP}:0", *CP_CONTROLLER_FLAGS],
                                    ready="READY", name="controller")
            grpc = re.search(r"grpc=(\S+)", line).group(1)
            _, ready = procs.start([str(BIN / "dataplane"), "--controller", f"http://{grpc}", "--node-id", "bench-real",
                                    "--frontend-address", CP_NODE_IP, "--admin-listen", f"{CP_NODE_IP}:0"],
                                   ready="READY", name="dataplane")
            node_admin = re.search(r"admin=(\S+)", ready).group(1)
            cmd = [str(BIN / "loadgen"), "control-plane", "--controller", f"http://{grpc}",
                   "--services", str(size["services"]), "--backends", str(size["backends"]),
                   "--nodes", str(size["nodes"]), "--changes", str(size["changes"]),
                   "--backend-address", CP_BACKEND_IP, "--time-limit", f"{limit}s", "--timeout", "60s",
                   "--hold", "--json", "-"]
            log(f"control plane: {size['services']} services x {size['backends']} backends, "
                f"{size['nodes']} simulated nodes + 1 real, {size['changes']} changes")
            cpu_before, children_before = cpu_seconds(ctl.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.time()
            with open(driver_err, "w") as err:
                driver = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
            # The driver bounds itself (--time-limit); this bounds the reading of its report too.
            watchdog = threading.Timer(limit + 60, driver.kill)
            watchdog.start()
            try:
                # The report is pretty JSON: its last line is a lone `}`. The driver then holds the cluster
                # until its stdin closes, so the real node is read at the final state.
                lines = []
                for text in driver.stdout:
                    lines.append(text)
                    if text.rstrip("\n") == "}":
                        break
                if not lines or lines[-1].rstrip("\n") != "}":
                    driver.wait(timeout=30)
                    raise RuntimeError(f"loadgen control-plane failed ({driver.returncode}): "
                                       f"{driver_err.read_text().strip()[-1500:]}")
                report = json.loads("".join(lines))
                wall = time.time() - started
                out["controller"] = {"cpu_s": cpu_seconds(ctl.pid) - cpu_before, "wall_s": wall,
                                     "rss_mib": rss_mib(ctl.pid), "peak_rss_mib": peak_rss_mib(ctl.pid)}
                out["loadgen"] = report
                # The real node follows the same controller: read it once it has the final version.
                final = report["final_snapshot"]["version"]
                deadline, state = time.time() + 30, {}
                while time.time() < deadline:
                    state = http_json(node_admin, "/api/state")
                    if state.get("version", 0) >= final:
                        break
                    time.sleep(0.05)
                apply_ms, apply_key = apply_time(state)
                out["real_node"] = {"version": state.get("version"), "services": len(state.get("services", [])),
                                    "frontends": len(state.get("frontends", [])), "apply_ms": apply_ms,
                                    "apply_key": apply_key}
            finally:
                if driver.stdin:
                    driver.stdin.close()
                try:
                    driver.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    driver.kill()
                    driver.wait()
                watchdog.cancel()
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            out["loadgen_cpu_s"] = ((children_after.ru_utime + children_after.ru_stime)
                                    - (children_before.ru_utime + children_before.ru_stime))
            # The driver's own summary (its log lines aside).
            log("\n".join(l for l in driver_err.read_text().splitlines() if not re.match(r"^\S+Z\s", l)))
        finally:
            procs.stop_all()
    return out


def cp_markdown(result):
    r, size = result["loadgen"], result["size"]
    ctl, node = result["controller"], result["real_node"]
    m = result["machine"]

    def ms(v):
        return "n/a" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")

    def spread(t, keys=("p50_ms", "p99_ms", "max_ms")):
        return "n/a" if not t else " / ".join(ms(t[k]) for k in keys) + " ms"

    def verdict(value, target):
        return "" if value is None else ("met" if value < target else "missed")

    scale = f"{size['services']:,} services × {size['backends']} backends → {size['nodes']} nodes"
    first, more, change = r.get("register_first"), r.get("register_more"), r.get("change_last_ack")
    snap = r["final_snapshot"]
    rows = [
        ("register → frontend open (first backend of each service, one at a time), p50 / p99 / max",
         spread(first), "p99 < 5 ms", verdict(first and first["p99_ms"], 5)),
        ("register, other backends (every stream at once), p50 / p99 / max", spread(more), "", ""),
        (f"health change → every node ACKed ({size['changes']} flips), "
         "p50 / p99 / max", spread(change), "p99 < 50 ms", verdict(change and change["p99_ms"], 50)),
        (f"full push, {scale}: change → last ACK, p50 / max", spread(change, ("p50_ms", "max_ms")),
         "< 100 ms (1,000 × 10 → 100)",
         verdict(change and change["max_ms"], 100) if size == {**size, **CP_SIZES["full"]} else "(other size)"),
        ("node apply (real `dataplane`, last snapshot)",
         "n/a (not reported by the node)" if node["apply_ms"] is None else f"{ms(node['apply_ms'])} ms",
         "< 5 ms", verdict(node["apply_ms"], 5)),
        ("controller CPU over the run", f"{ctl['cpu_s']:.1f} s in {ctl['wall_s']:.1f} s", "", ""),
        ("controller RSS at the end / peak", f"{ctl['rss_mib']:.0f} / {ctl['peak_rss_mib']:.0f} MiB", "", ""),
        ("load driver CPU (simulated nodes and registrations)", f"{result['loadgen_cpu_s']:.1f} s", "", ""),
    ]
    out = [f"Machine: {m['nproc']} cores, {m['cpu']}, kernel {m['kernel']}. {scale} (+1 real node)"
           f"{' (quick mode)' if result['quick'] else ''}; controller flags: {' '.join(result['controller_flags'])}.",
           "", "| | measured | target | |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", f"Registration phases: first backends {r['register_first_s']:.1f} s, other backends "
                f"{r['register_more_s']:.1f} s over {r['register_streams']} Register streams; last snapshot: "
                f"version {snap['version']}, {snap['services']:,} services, {snap['backends']:,} backends, "
                f"last message (a delta once a node holds a snapshot) {snap['bytes']:,} bytes; {r['snapshots_per_node']:.0f} snapshots per node. Change: {r['change']}.",
            ""]
    if r.get("answers_with_note"):
        out += [f"{r['answers_with_note']} registration answers carried a note, e.g. {r['note_example']!r}.", ""]
    return "\n".join(out)
