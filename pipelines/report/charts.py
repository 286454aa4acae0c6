"""Inline SVG charts and HTML helpers for the report (no plotting dependency, no scripts).

Every function returns a self-contained HTML/SVG string; all text is escaped.
"""
from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
KEPT_COLOR = "#2ca02c"


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """Numbers for tables: ints with thousands separators, floats with 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """An HTML table; cells from column ``numeric_from`` on are right-aligned numbers."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{fmt(c)}</td>" if i >= numeric_from else f"<td>{fmt(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def color_of(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def stacked_bars(rows: list[tuple[str, list[tuple[str, int, str]]]], width: int = 640) -> str:
    """Horizontal stacked bars, one per label: rows = [(label, [(part, count, colour), ...])].

    Each bar is scaled to its own total (shares, not absolute sizes), with the total printed.
    """
    bar_h, gap, label_w, total_w = 18, 8, 150, 80
    plot_w = width - label_w - total_w
    height = len(rows) * (bar_h + gap) + gap
    parts = []
    for i, (label, segments) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        total = sum(c for _, c, _ in segments) or 1
        x = float(label_w)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{esc(label)}</text>')
        for name, count, colour in segments:
            w = plot_w * count / total
            if w <= 0:
                continue
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                         f'<title>{esc(name)}: {count:,} ({100 * count / total:.1f}%)</title></rect>')
            x += w
        parts.append(f'<text x="{label_w + plot_w + 6}" y="{y + 13}">{sum(c for _, c, _ in segments):,}</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img">{"".join(parts)}</svg>')


def legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{esc(name)}</span>' for name, c in items) + "</div>"


def line_chart(title: str, xs: list[float], series: dict[str, list[float | None]], width: int = 460,
               height: int = 240, log_y: bool = False) -> str:
    """A line chart of several series over shared x values (None = gap), with axes and a legend."""
    left, right, top, bottom = 56, 10, 24, 34
    points = [(x, y) for ys in series.values() for x, y in zip(xs, ys) if y is not None and (y > 0 or not log_y)]
    if not points:
        return f'<p class="missing">{esc(title)}: no values</p>'
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(tf(p[1]) for p in points), max(tf(p[1]) for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + pw * (x - x0) / (x1 - x0)

    def py(y):
        return top + ph * (1 - (tf(y) - y0) / (y1 - y0))

    out = [f'<text x="{width / 2}" y="15" text-anchor="middle" class="title">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for k in range(5):
        fy = y0 + (y1 - y0) * k / 4
        y = top + ph * (1 - k / 4)
        label = 10 ** fy if log_y else fy
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label:.3g}</text>')
        fx = x0 + (x1 - x0) * k / 4
        out.append(f'<text x="{px(fx):.1f}" y="{top + ph + 14}" text-anchor="middle">{fx:.4g}</text>')
    for i, (name, ys) in enumerate(series.items()):
        segments, current = [], []
        for x, y in zip(xs, ys):
            if y is None or (log_y and y <= 0):  # a gap ends the current segment
                if current:
                    segments.append(current)
                current = []
                continue
            current.append(f"{px(x):.1f},{py(y):.1f}")
        if current:
            segments.append(current)
        for seg in segments:
            out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color_of(i)}" '
                       f'stroke-width="1.5"><title>{esc(name)}</title></polyline>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    svg = (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
           f'{"".join(out)}</svg>')
    return f'<figure>{svg}{legend([(n, color_of(i)) for i, n in enumerate(series)])}</figure>'


def bar_chart(title: str, values: list[float], width: int = 640, height: int = 160, colour: str = "#1f77b4") -> str:
    """Vertical bars of ``values`` in order (e.g. code frequencies sorted by rank)."""
    left, top, bottom = 40, 22, 18
    pw, ph = width - left - 8, height - top - bottom
    peak = max(values) if values else 0
    if not peak:
        return f'<p class="missing">{esc(title)}: no values</p>'
    w = pw / len(values)
    bars = "".join(
        f'<rect x="{left + i * w:.2f}" y="{top + ph * (1 - v / peak):.2f}" width="{max(w, 0.5):.2f}" '
        f'height="{ph * v / peak:.2f}" fill="{colour}"/>' for i, v in enumerate(values) if v)
    axis = (f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak:.3g}</text>'
            f'<text x="{left - 4}" y="{top + ph + 4}" text-anchor="end">0</text>'
            f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="grid"/>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
            f'<text x="{width / 2}" y="14" text-anchor="middle" class="title">{esc(title)}</text>'
            f'{axis}{bars}</svg>')


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#20232a;color:#fff;padding:16px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#bbb}nav a{color:#9cf;margin-right:14px}
main{max-width:1100px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 20px;margin:18px 0}
h2{font-size:18px;margin:6px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:3px 10px;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}.chart{max-width:100%;height:auto;font-size:11px}.chart .title{font-size:13px;font-weight:600}
.chart .frame{fill:none;stroke:#ccc}.chart .grid{stroke:#eee}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
.legend{font-size:12px}.legend span{margin-right:12px;white-space:nowrap}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.samples{display:flex;flex-wrap:wrap;gap:14px}.sample{width:300px;font-size:12px}
.sample .pics{display:flex;gap:6px}.sample img{width:144px;height:144px;image-rendering:pixelated;border:1px solid #ddd}
.row{display:flex;flex-wrap:wrap;gap:28px}.missing{color:#a33;font-style:italic}.note{color:#666;font-size:12px}
"""
