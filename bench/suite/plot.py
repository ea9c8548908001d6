"""SVG charts, written by hand (standard library only): the suite's ratios to direct-to-backend and the
skew scenario's connections per backend."""

from .report import WORKLOADS, summarize


def svg_bars(results, path):
    """One group of bars per workload: each proxy's ratio to direct."""
    names, table = summarize(results)
    names = [n for n in names if n != "direct"]
    colors = {"switchboard": "#1f77b4", "haproxy": "#ff7f0e", "haproxy-1t": "#ffbb78", "nginx": "#2ca02c"}
    width, height, left, top, bar = 900, 360, 60, 40, 28
    groups = [w for w in WORKLOADS if any((w[0], n) in table for n in names)]
    group_w = (width - left - 20) / max(len(groups), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-family="sans-serif" font-size="15">'
             'Throughput as a ratio to direct-to-backend (median; higher is better)</text>']
    plot_h = height - top - 70
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 20}" y2="{top + plot_h}" stroke="#444"/>')
    for tick in (0.25, 0.5, 0.75, 1.0):
        y = top + plot_h - tick * plot_h
        parts.append(f'<line x1="{left}" y1="{y}" x2="{width - 20}" y2="{y}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" font-family="sans-serif" font-size="11">{tick:.2f}</text>')
    for gi, (key, title, _, _) in enumerate(groups):
        gx = left + gi * group_w + 10
        for ni, n in enumerate(names):
            if (key, n) not in table:
                continue
            ratio = min(table[(key, n)]["ratio"], 1.2)
            h = ratio * plot_h
            x = gx + ni * bar
            parts.append(f'<rect x="{x}" y="{top + plot_h - h}" width="{bar - 4}" height="{h}" fill="{colors.get(n, "#999")}">'
                         f'<title>{n}: {table[(key, n)]["ratio"]:.2f}</title></rect>')
        label = title.split(" (")[0]
        parts.append(f'<text x="{gx + len(names) * bar / 2}" y="{top + plot_h + 16}" text-anchor="middle" '
                     f'font-family="sans-serif" font-size="11">{label}</text>')
    for ni, n in enumerate(names):
        parts.append(f'<rect x="{left + ni * 140}" y="{height - 28}" width="12" height="12" fill="{colors.get(n, "#999")}"/>')
        parts.append(f'<text x="{left + ni * 140 + 16}" y="{height - 18}" font-family="sans-serif" font-size="12">{n}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def svg_skew(result, path):
    """Connections per backend for each case, against the ideal even split."""
    width, height, left, top = 900, 340, 60, 40
    cases = list(result)
    total = sum(result[cases[0]]["counts"])
    ideal = total / len(result[cases[0]]["counts"])
    top_value = max(max(c["counts"]) for c in result.values()) * 1.15
    plot_h = height - top - 80
    group_w = (width - left - 20) / len(cases)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-family="sans-serif" font-size="15">'
             'Connections per backend after a skewed load (dashed: the ideal even split)</text>']
    y_ideal = top + plot_h - ideal / top_value * plot_h
    for gi, label in enumerate(cases):
        gx = left + gi * group_w + 12
        for bi, count in enumerate(result[label]["counts"]):
            h = count / top_value * plot_h
            parts.append(f'<rect x="{gx + bi * 34}" y="{top + plot_h - h}" width="28" height="{h}" fill="{colors[bi % 4]}">'
                         f'<title>backend {bi + 1}: {count}</title></rect>')
            parts.append(f'<text x="{gx + bi * 34 + 14}" y="{top + plot_h - h - 4}" text-anchor="middle" '
                         f'font-family="sans-serif" font-size="11">{count}</text>')
        parts.append(f'<text x="{gx + 68}" y="{top + plot_h + 18}" text-anchor="middle" font-family="sans-serif" '
                     f'font-size="11">{label}</text>')
    parts.append(f'<line x1="{left}" y1="{y_ideal}" x2="{width - 20}" y2="{y_ideal}" stroke="#444" stroke-dasharray="6 4"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
