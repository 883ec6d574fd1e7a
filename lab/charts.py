"""Small line charts as plain SVG, for the app's live view: cheap for a browser to redraw twice a second.

A chart is a few polylines in a box with ticked, titled axes. It is sent as an HTML string, so a redraw replaces a
few kilobytes of markup: no plotting library runs in the page, and a redraw costs the browser milliseconds however
many charts there are. Each chart is its own block, with its title, legend and a one-line note above and below the
plot, so titles never overlap on a narrow screen (the charts wrap onto more rows instead).

    chart = Chart("reward", "step", "reward (task's own units)", [Series("reward/mean", [1, 2], [0.5, 0.7])])
    html = grid([chart])

Nothing here imports a UI library.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#475569")
WIDTH, HEIGHT = 360, 200  # the SVG's own units; it scales to its box
LEFT, RIGHT, TOP, BOTTOM = 52, 10, 8, 36  # margins for tick labels and axis titles

CSS = """
.lab-charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(290px, 1fr)); gap: 10px; }
.lab-chart { border: 1px solid #e5e7eb; border-radius: 6px; padding: 4px 6px; background: #fff; min-width: 0; }
.lab-chart-title { font-weight: 600; font-size: 0.9em; }
.lab-chart-legend { font-size: 0.8em; line-height: 1.3; overflow-wrap: anywhere; }
.lab-chart-legend span { margin-right: 8px; }
.lab-chart-note { font-size: 0.78em; color: #4b5563; }
.lab-chart svg { width: 100%; height: auto; display: block; }
.lab-chart-empty { color: #6b7280; padding: 24px; text-align: center; border: 1px dashed #d1d5db; border-radius: 6px; }
"""


@dataclass
class Series:
    """One line: its name (the legend), x and y (None: no point), its colour and style."""

    name: str
    x: list[float]
    y: list[float | None]
    color: str = COLORS[0]
    dash: bool = False
    markers: bool | None = None  # None: markers while there are few points


@dataclass
class Chart:
    """One plot: a title, named axes (with units), lines, and a note (what healthy looks like)."""

    title: str
    x_title: str
    y_title: str
    series: list[Series] = field(default_factory=list)
    note: str = ""
    elem_id: str | None = None


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]; whole numbers only if ``integer``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    raw = max(raw, 1.0) if integer else raw
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= 0.75 * raw)  # about n ticks, at most n + 1
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _bounds(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _points(series: Series) -> list[tuple[float, float]]:
    return [
        (float(x), float(y))
        for x, y in zip(series.x, series.y)
        if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))
    ]


def svg(chart: Chart) -> str:
    """The chart's plot area as an SVG string (axes, ticks, axis titles, one polyline per series)."""
    pts = {id(s): _points(s) for s in chart.series}
    xs = [x for p in pts.values() for x, _ in p]
    ys = [y for p in pts.values() for _, y in p]
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [f"<svg viewBox='0 0 {WIDTH} {HEIGHT}' xmlns='http://www.w3.org/2000/svg' font-size='10'>"]
    if xs:
        (x0, x1), (y0, y1) = _bounds(xs), _bounds(ys)

        def px(x):
            return LEFT + (x - x0) / (x1 - x0) * w

        def py(y):
            return TOP + h - (y - y0) / (y1 - y0) * h

        for t in nice_ticks(y0, y1):
            out.append(f"<line x1='{LEFT}' x2='{LEFT + w}' y1='{py(t):.1f}' y2='{py(t):.1f}' stroke='#eef0f3'/>")
            out.append(f"<text x='{LEFT - 4}' y='{py(t) + 3:.1f}' text-anchor='end' fill='#4b5563'>{_fmt(t)}</text>")
        for t in nice_ticks(x0, x1, 6, integer=all(float(x).is_integer() for x in xs)):
            out.append(f"<text x='{px(t):.1f}' y='{TOP + h + 12}' text-anchor='middle' fill='#4b5563'>{_fmt(t)}</text>")
        for s in chart.series:
            p = pts[id(s)]
            if not p:
                continue
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in p)
            dash = " stroke-dasharray='5 3'" if s.dash else ""
            name = html.escape(s.name)
            out.append(
                f"<polyline fill='none' stroke='{s.color}' stroke-width='1.8'{dash} points='{coords}'>"
                f"<title>{name}</title></polyline>"
            )
            if s.markers if s.markers is not None else len(p) < 8:
                out += [
                    f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='2.4' fill='{s.color}'>"
                    f"<title>{name}: ({_fmt(x)}, {_fmt(y)})</title></circle>"
                    for x, y in p
                ]
    out.append(f"<rect x='{LEFT}' y='{TOP}' width='{w}' height='{h}' fill='none' stroke='#9ca3af'/>")
    out.append(
        f"<text x='{LEFT + w / 2:.0f}' y='{HEIGHT - 4}' text-anchor='middle' fill='#111827'>"
        f"{html.escape(chart.x_title)}</text>"
    )
    out.append(
        f"<text transform='translate(11 {TOP + h / 2:.0f}) rotate(-90)' text-anchor='middle' fill='#111827'>"
        f"{html.escape(chart.y_title)}</text>"
    )
    out.append("</svg>")
    return "".join(out)


def render(chart: Chart) -> str:
    """The chart as one HTML block: title, legend, the SVG, and its note."""
    legend = "".join(
        f"<span><b style='color:{s.color}'>{'┅' if s.dash else '━'}</b> {html.escape(s.name)}</span>"
        for s in chart.series
    )
    ident = f" id='{html.escape(chart.elem_id)}'" if chart.elem_id else ""
    note = f"<div class='lab-chart-note'>{html.escape(chart.note)}</div>" if chart.note else ""
    if not chart.series and not chart.x_title:  # a note in the grid, no plot
        return (
            f"<div class='lab-chart'{ident}><div class='lab-chart-title'>{html.escape(chart.title)}</div>{note}</div>"
        )
    return (
        f"<div class='lab-chart'{ident}><div class='lab-chart-title'>{html.escape(chart.title)}</div>"
        f"<div class='lab-chart-legend'>{legend}</div>{svg(chart)}{note}</div>"
    )


def grid(charts: list[Chart], empty: str = "charts appear with the first step", elem_id: str = "") -> str:
    """Charts side by side, wrapping onto more rows on a narrow screen."""
    ident = f" id='{elem_id}'" if elem_id else ""
    if not charts:
        return f"<div class='lab-charts-box'{ident}><div class='lab-chart-empty'>{html.escape(empty)}</div></div>"
    return f"<div class='lab-charts'{ident}>" + "".join(render(c) for c in charts) + "</div>"


# ----------------------------------------------------------------------------------------------------------------------
# What healthy looks like, from the README's glossary


def glossary(readme: str | Path) -> dict[str, dict[str, str]]:
    """The README's metric glossary: {section: {metric: healthy}}. A section is the bold line above each table
    ("All trainers", "REINFORCE and GRPO (lab/reinforce.py, lab/grpo.py)"...). Empty when there is no README."""
    try:
        text = Path(readme).read_text(encoding="utf-8")
    except OSError:
        return {}
    start = text.find("## Glossary")
    out: dict[str, dict[str, str]] = {}
    section = ""
    for line in text[start:].splitlines() if start >= 0 else []:
        if line.startswith("**"):
            section = line.strip("* ").replace("**", "")
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("metric", "---"):
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            out.setdefault(section, {}).setdefault(name, cells[-1].replace("`", ""))
    return out


def healthy(table: dict[str, dict[str, str]], method: str, metric: str) -> str:
    """The glossary's healthy line for ``metric`` of ``method``: its own section first, then "All trainers",
    then any section."""
    own = [s for s in table if f"lab/{method}.py" in s or s.lower().startswith(method.lower())]
    for section in [*own, "All trainers", *table]:
        line = table.get(section, {}).get(metric)
        if line:
            return line
    return ""
