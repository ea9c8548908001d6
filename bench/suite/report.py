"""Statistics and tables: percentiles, and the suite's medians over repetitions, ratios to
direct-to-backend and to the best peer, CPU per request or per GB, printed as Markdown for
BENCHMARKS.md."""

import statistics

from .peers import IDLE_CONNECTIONS


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


WORKLOADS = [
    ("bulk1", "bulk, 1 stream (iperf3)", "gbit", "Gbit/s"),
    ("bulk4", "bulk, 4 streams (iperf3)", "gbit", "Gbit/s"),
    ("newconn", "new connection per request (wrk, Connection: close)", "rate", "req/s"),
    ("keepalive", "keep-alive requests (wrk)", "rate", "req/s"),
    ("udp", "UDP request/response (loadgen, 32 flows)", "rate", "req/s"),
]


def summarize(results):
    names = list(results["runs"][0]["results"])
    table = {}
    for key, _, metric, _ in WORKLOADS:
        for name in names:
            values, ratios, cpu = [], [], []
            for run_rep in results["runs"]:
                r = run_rep["results"][name].get(key)
                direct = run_rep["results"]["direct"].get(key)
                if not r or not direct:
                    continue
                values.append(r[metric])
                ratios.append(r[metric] / direct[metric] if direct[metric] else 0.0)
                if "cpu_s" in r:
                    if metric == "gbit":
                        cpu.append(r["cpu_s"] / (r["bytes"] / 1e9) if r["bytes"] else 0.0)
                    else:
                        cpu.append(r["cpu_s"] * 1e6 / r["requests"] if r["requests"] else 0.0)
            if values:
                table[(key, name)] = {
                    "median": statistics.median(values), "min": min(values), "max": max(values),
                    "ratio": statistics.median(ratios), "cpu": statistics.median(cpu) if cpu else None,
                    "rss": statistics.median([run_rep["results"][name][key].get("rss_mib", 0) for run_rep in results["runs"]
                                              if key in run_rep["results"][name]]),
                }
    return names, table


def markdown(results):
    names, table = summarize(results)
    m = results["machine"]
    out = [f"Machine: {m['nproc']} cores, {m['cpu']}, kernel {m['kernel']}. "
           f"{', '.join(m['versions'].values())}. "
           f"{results['reps']} repetition(s){' (quick mode)' if results['quick'] else ''}, medians.", ""]
    peers = [n for n in names if n.startswith("haproxy") or n == "nginx"]
    for key, title, metric, unit in WORKLOADS:
        rows = [n for n in names if (key, n) in table]
        if not rows:
            continue
        best_peer = max((table[(key, n)]["median"] for n in peers if (key, n) in table), default=None)
        cpu_unit = "CPU s/GB" if metric == "gbit" else "CPU µs/req"
        out += [f"### {title}", "", f"| | median {unit} | min–max | × direct | × best peer | {cpu_unit} |",
                "|---|---|---|---|---|---|"]
        for n in rows:
            t = table[(key, n)]
            vs_peer = f"{t['median'] / best_peer:.2f}" if best_peer and n != "direct" else ""
            cpu = f"{t['cpu']:.2f}" if t["cpu"] is not None else ""
            fmt = (lambda v: f"{v:.2f}") if metric == "gbit" else (lambda v: f"{v:,.0f}")
            out.append(f"| {n} | {fmt(t['median'])} | {fmt(t['min'])}–{fmt(t['max'])} | {t['ratio']:.2f} | {vs_peer} | {cpu} |")
        out.append("")
    # Latency at fixed rate.
    out += ["### latency at a fixed rate (loadgen, open loop, 50 connections, keep-alive HTTP)", "",
            "| | rate | p50 µs | p99 µs | p99.9 µs | errors |", "|---|---|---|---|---|---|"]
    for n in names:
        lat = [r["results"][n]["latency"] for r in results["runs"]]
        med = lambda k: statistics.median([x[k] for x in lat if x.get(k) is not None] or [0])
        out.append(f"| {n} | {lat[0]['rate']:,} | {med('p50'):.0f} | {med('p99'):.0f} | {med('p999'):.0f} | "
                   f"{sum(x['errors'] for x in lat)} |")
    out.append("")
    out += [f"### memory: {IDLE_CONNECTIONS:,} idle proxied connections", "",
            "| | RSS before, MiB | RSS holding them, MiB | KiB per connection |", "|---|---|---|---|"]
    for n in names:
        idle = [r["results"][n]["idle"] for r in results["runs"] if "idle" in r["results"][n]]
        if idle:
            before = statistics.median(x["rss_before_mib"] for x in idle)
            held = statistics.median(x["rss_idle_mib"] for x in idle)
            out.append(f"| {n} | {before:.1f} | {held:.1f} | {(held - before) * 1024 / IDLE_CONNECTIONS:.2f} |")
    out.append("")
    rss = {n: statistics.median([r["results"][n]["keepalive"].get("rss_mib", 0) for r in results["runs"]]) for n in names if n != "direct"}
    out += ["RSS after the keep-alive run (MiB): " + ", ".join(f"{n} {v:.1f}" for n, v in rss.items()), ""]
    lw = [r["loadgen_vs_wrk"] for r in results["runs"]]
    ratio = statistics.median([x["loadgen"] / x["wrk"] for x in lw])
    out += [f"loadgen against wrk, keep-alive HTTP straight to nginx, 50 connections: wrk "
            f"{statistics.median([x['wrk'] for x in lw]):,.0f} req/s, loadgen "
            f"{statistics.median([x['loadgen'] for x in lw]):,.0f} req/s: **{ratio:.2f}× wrk**.", ""]
    return "\n".join(out)
