"""Small SVG charts for the leaderboard page, written by hand: no plotting library, and coordinates with a fixed
number of decimals, so the same records always give the same bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MARKERS = ("circle", "square", "triangle", "diamond")

WIDTH, HEIGHT = 440, 260  # plot area
LEFT, TOP, BOTTOM, GAP, LEGEND = 64, 34, 46, 24, 250  # margins, space before the legend, legend width
ROW = 16  # legend line height


@dataclass(frozen=True)
class Axis:
    label: str
    log: bool = False  # log10 scale (values <= 0 are left out)
    rate: bool = False  # a share in [0, 1], ticks as percentages


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    marker: str  # one of MARKERS
    points: tuple[tuple[float, float], ...]
    line: bool = False  # join the points, in order


def _f(v: float) -> str:
    return f"{v:.1f}"


def _nice_step(span: float) -> float:
    """A 1-2-5 step giving at most about five ticks over ``span`` > 0."""
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _ticks(axis: Axis, values: list[float]) -> tuple[float, float, list[tuple[float, str]]]:
    """(low, high, [(value, label)]) of an axis in its own scale (log axes: exponents)."""
    if axis.rate:
        return 0.0, 1.0, [(k / 4, f"{25 * k}%") for k in range(5)]
    if axis.log:
        lo = math.floor(math.log10(min(values)))
        hi = max(math.ceil(math.log10(max(values))), lo + 1)
        every = math.ceil((hi - lo) / 6)
        return lo, hi, [(e, f"{10.0 ** e:g}") for e in range(lo, hi + 1, every)]
    top = max(values)
    step = _nice_step(top if top > 0 else 1.0)
    hi = step * max(1, math.ceil(top / step - 1e-9))
    return 0.0, hi, [(k * step, f"{k * step:g}") for k in range(round(hi / step) + 1)]


def _marker(shape: str, x: float, y: float, color: str) -> str:
    r = 4.0
    if shape == "circle":
        return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" fill="{color}"/>'
    if shape == "square":
        return f'<rect x="{_f(x - r)}" y="{_f(y - r)}" width="{_f(2 * r)}" height="{_f(2 * r)}" fill="{color}"/>'
    corners = ([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)] if shape == "triangle" else
               [(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)])
    return f'<polygon points="{" ".join(f"{_f(a)},{_f(b)}" for a, b in corners)}" fill="{color}"/>'


def chart(title: str, x: Axis, y: Axis, series: list[Series]) -> str:
    """One chart as an inline ``<svg>`` element: the series' points (and lines), axes with ticks, a legend."""
    keep = lambda ax, v: v > 0 if ax.log else True  # noqa: E731
    series = [Series(s.label, s.color, s.marker, tuple(p for p in s.points if keep(x, p[0]) and keep(y, p[1])),
                     s.line) for s in series]
    series = [s for s in series if s.points]
    height = max(TOP + HEIGHT + BOTTOM, TOP + ROW * (len(series) + 1))
    width = LEFT + WIDTH + GAP + LEGEND
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>']
    if not series:
        out += [f'<text x="{LEFT}" y="{TOP + 20}">no records with these numbers yet</text>', "</svg>"]
        return "\n".join(out)
    xlo, xhi, xt = _ticks(x, [p[0] for s in series for p in s.points])
    ylo, yhi, yt = _ticks(y, [p[1] for s in series for p in s.points])
    scale = lambda ax, v: math.log10(v) if ax.log else v  # noqa: E731
    px = lambda v: LEFT + (scale(x, v) - xlo) / (xhi - xlo) * WIDTH  # noqa: E731
    py = lambda v: TOP + HEIGHT - (scale(y, v) - ylo) / (yhi - ylo) * HEIGHT  # noqa: E731
    bottom = TOP + HEIGHT
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH}" height="{HEIGHT}" fill="none" stroke="#999"/>')
    for v, label in xt:
        gx = LEFT + (v - xlo) / (xhi - xlo) * WIDTH
        out.append(f'<line x1="{_f(gx)}" y1="{TOP}" x2="{_f(gx)}" y2="{bottom}" stroke="#eee"/>'
                   f'<text x="{_f(gx)}" y="{bottom + 15}" text-anchor="middle">{escape(label)}</text>')
    for v, label in yt:
        gy = bottom - (v - ylo) / (yhi - ylo) * HEIGHT
        out.append(f'<line x1="{LEFT}" y1="{_f(gy)}" x2="{LEFT + WIDTH}" y2="{_f(gy)}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{_f(gy + 4)}" text-anchor="end">{escape(label)}</text>')
    out.append(f'<text x="{LEFT + WIDTH / 2:.1f}" y="{bottom + 36}" text-anchor="middle">{escape(x.label)}</text>')
    out.append(f'<text transform="translate(16,{TOP + HEIGHT / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f'{escape(y.label)}</text>')
    for s in series:
        pts = [(px(a), py(b)) for a, b in s.points]
        if s.line and len(pts) > 1:
            out.append(f'<polyline points="{" ".join(f"{_f(a)},{_f(b)}" for a, b in pts)}" fill="none" '
                       f'stroke="{s.color}" stroke-width="1.5"/>')
        out += [_marker(s.marker, a, b, s.color) for a, b in pts]
    lx = LEFT + WIDTH + GAP
    for k, s in enumerate(series):
        ly = TOP + ROW * k + 4
        out.append(_marker(s.marker, lx + 5, ly, s.color)
                   + f'<text x="{lx + 16}" y="{ly + 4}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
