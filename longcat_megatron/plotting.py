"""Line charts as PNG files with numpy + zlib only (no matplotlib dependency).

:func:`line_chart_png` draws stacked panels, each with several named series, axis boxes and the
y-range / x-range printed with a built-in 3x5 pixel font (digits, a few letters and symbols), and
writes an RGB PNG. Meant for ``python -m longcat_megatron.status``: readable at a glance, not
publication quality. Series names go in the legend rows under each panel (colour swatch + text).
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np

# 3x5 glyphs, rows top to bottom, 3 bits each (4 = left pixel).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "+": (0, 2, 7, 2, 0), "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0), "/": (1, 1, 2, 4, 4),
    "_": (0, 0, 0, 0, 7), ":": (0, 2, 0, 2, 0), "=": (0, 7, 0, 7, 0),
}
for _c, _rows in {
    "a": (0, 7, 1, 7, 7), "b": (4, 4, 7, 5, 7), "c": (0, 7, 4, 4, 7), "d": (1, 1, 7, 5, 7),
    "f": (3, 4, 6, 4, 4), "g": (7, 5, 7, 1, 7), "h": (4, 4, 7, 5, 5), "i": (2, 0, 2, 2, 2),
    "j": (1, 0, 1, 5, 7), "k": (4, 5, 6, 5, 5), "l": (6, 2, 2, 2, 7), "m": (0, 7, 7, 5, 5),
    "n": (0, 6, 5, 5, 5), "o": (0, 7, 5, 5, 7), "p": (7, 5, 7, 4, 4), "q": (7, 5, 7, 1, 1),
    "r": (0, 7, 4, 4, 4), "s": (0, 3, 6, 1, 6), "t": (4, 7, 4, 4, 3), "u": (0, 5, 5, 5, 7),
    "v": (0, 5, 5, 5, 2), "w": (0, 5, 5, 7, 7), "x": (0, 5, 2, 2, 5), "y": (5, 5, 7, 1, 7),
    "z": (0, 7, 1, 4, 7),
}.items():
    _FONT[_c] = _rows

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an ``[H, W, 3]`` uint8 array as a PNG (8-bit RGB, zlib-compressed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> None:
    """Draw ``text`` (lower-cased; unknown characters as blanks) with its top-left at (x, y)."""
    for i, ch in enumerate(text.lower()):
        rows = _FONT.get(ch, _FONT[" "])
        for r, bits in enumerate(rows):
            for c in range(3):
                if bits & (4 >> c):
                    y0, x0 = y + r * scale, x + (i * 4 + c) * scale
                    img[max(y0, 0):max(y0 + scale, 0), max(x0, 0):max(x0 + scale, 0)] = color


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    h, w, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
            img[ys[ok] + dy, xs[ok] + dx] = color


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart_png(path: str, panels: Sequence[tuple[str, dict]], width: int = 900,
                   panel_height: int = 260) -> None:
    """One panel per ``(title, {series name: (xs, ys)})``, stacked vertically, written to ``path``."""
    legend_rows = [max(1, (len(series) + 2) // 3) for _, series in panels]
    heights = [panel_height + 18 * rows + 30 for rows in legend_rows]
    img = np.full((sum(heights) + 10, width, 3), 255, dtype=np.uint8)
    top = 10
    for (title, series), ph, rows in zip(panels, heights, legend_rows):
        left, right = 90, width - 20
        y_top, y_bot = top + 24, top + 24 + panel_height - 40
        draw_text(img, left, top + 4, title, scale=3)
        pts = [(np.asarray(xs, float), np.asarray(ys, float)) for xs, ys in series.values()]
        finite = [y[np.isfinite(y)] for _, y in pts]
        allx = np.concatenate([x for x, _ in pts]) if pts else np.zeros(0)
        ally = np.concatenate(finite) if finite else np.zeros(0)
        for x0, y0, x1, y1 in ((left, y_top, right, y_top), (left, y_bot, right, y_bot),
                               (left, y_top, left, y_bot), (right, y_top, right, y_bot)):
            _line(img, x0, y0, x1, y1, (0, 0, 0))
        if allx.size and ally.size:
            xmin, xmax = float(allx.min()), float(allx.max())
            ymin, ymax = float(ally.min()), float(ally.max())
            if xmax == xmin:
                xmax = xmin + 1
            if ymax == ymin:
                ymin, ymax = ymin - 0.5, ymax + 0.5
            pad = 0.05 * (ymax - ymin)
            ymin, ymax = ymin - pad, ymax + pad
            draw_text(img, 4, y_top, _fmt(ymax))
            draw_text(img, 4, y_bot - 10, _fmt(ymin))
            draw_text(img, left, y_bot + 6, _fmt(xmin))
            label = _fmt(xmax)
            draw_text(img, right - 8 * len(label), y_bot + 6, label)
            for i, (xs, ys) in enumerate(pts):
                color = PALETTE[i % len(PALETTE)]
                px = left + (xs - xmin) / (xmax - xmin) * (right - left)
                py = y_bot - (ys - ymin) / (ymax - ymin) * (y_bot - y_top)
                good = np.isfinite(py)
                px, py = px[good], py[good]
                if px.size == 1:
                    _line(img, px[0] - 2, py[0], px[0] + 2, py[0], color, 2)
                for j in range(px.size - 1):
                    _line(img, px[j], py[j], px[j + 1], py[j + 1], color, 2)
        else:
            draw_text(img, left + 10, (y_top + y_bot) // 2, "no data")
        for i, name in enumerate(series):
            r, c = divmod(i, 3)
            x, y = left + c * (width - left) // 3, y_bot + 24 + 18 * r
            img[y + 2:y + 8, x:x + 14] = PALETTE[i % len(PALETTE)]
            draw_text(img, x + 18, y, name[:34])
        top += ph
    write_png(path, img)
