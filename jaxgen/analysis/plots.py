"""Line plots and grouped bar charts drawn with PIL (no matplotlib), in heatmaps.py's style.

Both return an RGB `PIL.Image`: axes with numbered ticks, light gridlines, a title, axis
labels and a legend with one distinct colour per series.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

from jaxgen.analysis.heatmaps import BLACK, WHITE, _text_size, font

# Ten well-separated colours (the usual 'tab10' cycle).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GRID, HLINE = (228, 228, 228), (110, 110, 110)
# The evaluated models keep their colours across figures; references are greys.
COLOURS = {'lexinvariant': PALETTE[0], 'standard': PALETTE[1], 'semi': PALETTE[2],
           'oracle': (90, 90, 90), 'chance': (185, 185, 185),
           'in-context bigram': (90, 90, 90), 'in-context unigram': (185, 185, 185)}


def nice_ticks(lo, hi, target=6):
  """Round-numbered ticks (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
  if not hi > lo:
    lo, hi = lo - 0.5, hi + 0.5
  step = 10.0 ** math.floor(math.log10((hi - lo) / target))
  for m in (1, 2, 5, 10):
    if (hi - lo) / (step * m) <= target:
      step *= m
      break
  first = math.ceil(lo / step - 1e-9) * step
  return [round(float(v), 12) for v in np.arange(first, hi + step * 1e-6, step)]


def log_ticks(lo, hi):
  """Ticks for a log axis over [lo, hi] (lo > 0): 1-2-5 per decade, or linear ones within
  a single decade."""
  if hi / lo < 10:
    return [v for v in nice_ticks(lo, hi, target=8) if v > 0]
  decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
  for mantissas in ((1, 2, 5), (1,)):
    ticks = [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]
    if len(ticks) <= 8:
      return ticks
  return ticks


def _fmt(v):
  return f'{v:.3g}' if abs(v) < 1e4 else f'{v:.1e}'


def tick_labels(ticks):
  """Labels for tick values: 3 significant digits, or as many decimals as keep them distinct
  (ticks 15.3, 15.35, 15.4 would otherwise read 15.3, 15.3, 15.4)."""
  labels = [_fmt(v) for v in ticks]
  for decimals in range(1, 7):
    if len(set(labels)) == len(labels):
      break
    labels = [f'{v:.{decimals}f}' for v in ticks]
  return labels


def _vertical_text(img, text, f, centre_x, centre_y):
  w, h = _text_size(text, f)
  tile = Image.new('RGB', (w + 2, h + 6), WHITE)
  ImageDraw.Draw(tile).text((0, 0), text, fill=BLACK, font=f)
  tile = tile.rotate(90, expand=True)
  img.paste(tile, (int(centre_x - tile.width / 2), int(centre_y - tile.height / 2)))


class _Axes:
  """Maps data to pixels inside a plot box and draws the frame, grid, ticks and labels."""

  def __init__(self, img, box, xlim, ylim, logy=False):
    self.img, self.draw, self.box, self.logy = img, ImageDraw.Draw(img), box, logy
    self.xlim = xlim
    self.ylim = tuple(math.log10(v) for v in ylim) if logy else ylim

  def x_px(self, x):
    (x0, _, x1, _), (xa, xb) = self.box, self.xlim
    return x0 + (x - xa) / ((xb - xa) or 1) * (x1 - x0)

  def y_px(self, y):
    (_, y0, _, y1), (ya, yb) = self.box, self.ylim
    y = math.log10(y) if self.logy else y
    return y1 - (y - ya) / ((yb - ya) or 1) * (y1 - y0)

  def px(self, x, y):
    return self.x_px(x), self.y_px(y)

  def frame(self, xticks, yticks, f, xlabels=None):
    x0, y0, x1, y1 = self.box
    for v, text in zip(yticks, tick_labels(yticks)):
      y = self.y_px(v)
      self.draw.line([(x0, y), (x1, y)], fill=GRID)
      w, h = _text_size(text, f)
      self.draw.text((x0 - w - 6, y - h / 2 - 2), text, fill=BLACK, font=f)
    grid = xlabels is None  # numeric x ticks get grid lines; category labels do not
    for v, label in zip(xticks, tick_labels(xticks) if grid else xlabels):
      x = self.x_px(v)
      if grid:
        self.draw.line([(x, y0), (x, y1)], fill=GRID)
      w, _ = _text_size(label, f)
      self.draw.text((x - w / 2, y1 + 5), label, fill=BLACK, font=f)
    self.draw.rectangle([x0, y0, x1, y1], outline=BLACK)

  def legend(self, entries, f, row=False):
    """entries: [(label, colour, dashed)] in a white box at the top right, or in one row
    above the plot box (row=True, where the data can reach the top)."""
    if not entries:
      return
    if row:
      x = self.box[0]
      for label, colour, _ in entries:
        self.draw.rectangle([x, self.box[1] - 14, x + 10, self.box[1] - 4], fill=colour)
        self.draw.text((x + 14, self.box[1] - 17), label, fill=BLACK, font=f)
        x += _text_size(label, f)[0] + 28
      return
    x1, y0 = self.box[2], self.box[1]
    width = max(_text_size(label, f)[0] for label, _, _ in entries) + 34
    left = x1 - width - 6
    self.draw.rectangle([left, y0 + 6, x1 - 6, y0 + 10 + 15 * len(entries)], fill=WHITE,
                        outline=(160, 160, 160))
    for i, (label, colour, dashed) in enumerate(entries):
      y = y0 + 15 + 15 * i
      _dashed_line(self.draw, [(left + 4, y), (left + 24, y)], colour, 2 if not dashed else 1,
                   dash=4 if dashed else 0)
      self.draw.text((left + 28, y - 7), label, fill=BLACK, font=f)


def _dashed_line(draw, points, colour, width, dash=0):
  (xa, ya), (xb, yb) = points
  if not dash:
    draw.line(points, fill=colour, width=width)
    return
  length = math.hypot(xb - xa, yb - ya)
  for s in np.arange(0, length, 2 * dash):
    e = min(s + dash, length)
    draw.line([(xa + (xb - xa) * s / length, ya + (yb - ya) * s / length),
               (xa + (xb - xa) * e / length, ya + (yb - ya) * e / length)], fill=colour,
              width=width)


def _canvas(size, title, xlabel, ylabel, ytick_width, top=30):
  """A white image with title and axis labels; returns (image, plot box, font)."""
  f, ft = font(11), font(13)
  img = Image.new('RGB', size, WHITE)
  draw = ImageDraw.Draw(img)
  draw.text((8, 6), title, fill=BLACK, font=ft)
  left = ytick_width + 30
  box = (left, top, size[0] - 14, size[1] - 44)
  w, _ = _text_size(xlabel, f)
  draw.text(((box[0] + box[2] - w) / 2, size[1] - 20), xlabel, fill=BLACK, font=f)
  if ylabel:
    _vertical_text(img, ylabel, f, 10, (box[1] + box[3]) / 2)
  return img, box, f


def line_plot(series, *, title, xlabel, ylabel, logy=False, hlines=None, size=(640, 400),
              ylim=None, colours=None):
  """series {label: (x, y)} as lines (NaNs, and y <= 0 on a log axis, are gaps).

  hlines: {label: y} (or a list of y values) drawn as dashed grey reference lines; ylim
  (lo, hi) fixes the y range of a linear axis (values outside are clipped to it), else the
  range fits the data. colours {label: (r, g, b)} overrides the palette's."""
  if hlines is not None and not isinstance(hlines, dict):
    hlines = {f'{y:g}': y for y in hlines}
  hlines = hlines or {}
  curves = []
  for label, (x, y) in series.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if ylim is not None and not logy:  # keep the lines inside the frame
      y = np.clip(y, *ylim)
    ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
    curves.append((label, x, y, ok))
  xs = np.concatenate([x[ok] for _, x, _, ok in curves] + [np.zeros(0)])
  ys = np.concatenate([y[ok] for _, _, y, ok in curves] +
                      [np.array([v for v in hlines.values() if v > 0 or not logy], float)])
  if not len(xs):
    xs = np.array([0.0, 1.0])
  if not len(ys):
    ys = np.array([1.0, 10.0]) if logy else np.array([0.0, 1.0])
  xlim = (float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1)
  if logy:
    lo, hi = float(ys.min()), float(ys.max())
    hi = hi if hi > lo else lo * 10
    pad = (hi / lo) ** 0.05
    ylim, yticks = (lo / pad, hi * pad), log_ticks(lo / pad, hi * pad)
  else:
    lo, hi = ylim or (float(ys.min()), float(ys.max()))
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    ylim = (lo - pad, hi + pad)
    yticks = [v for v in nice_ticks(*ylim) if ylim[0] <= v <= ylim[1]]
  f = font(11)
  img, box, f = _canvas(size, title, xlabel, ylabel,
                        max(_text_size(t, f)[0] for t in tick_labels(yticks)))
  ax = _Axes(img, box, xlim, ylim, logy)
  ax.frame([v for v in nice_ticks(*xlim, target=8) if xlim[0] <= v <= xlim[1]], yticks, f)
  entries = []
  for i, (label, x, y, ok) in enumerate(curves):
    colour = (colours or {}).get(label, PALETTE[i % len(PALETTE)])
    # Consecutive finite points form one polyline; a NaN ends it.
    breaks = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(int), [0]])))
    for s, e in zip(breaks[::2], breaks[1::2]):
      pts = [ax.px(a, b) for a, b in zip(x[s:e], y[s:e])]
      if len(pts) == 1 or len(x) <= 30:  # few points: mark them
        for px, py in pts:
          ax.draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
      if len(pts) > 1:
        ax.draw.line(pts, fill=colour, width=2)
    entries.append((label, colour, False))
  for label, y in hlines.items():
    if logy and y <= 0:
      continue
    _dashed_line(ax.draw, [ax.px(xlim[0], y), ax.px(xlim[1], y)], HLINE, 1, dash=5)
    if label:
      entries.append((label, HLINE, True))
  ax.legend(entries, f)
  return img


def bar_chart(groups, *, title, ylabel, ymax=None, size=(640, 400), fmt='{:.2f}',
              colours=None):
  """groups {group: {bar: value}}: one cluster of bars per group, one colour per bar name
  (colours {name: (r, g, b)} overrides the palette's), each bar labelled with its value
  (NaN: no bar)."""
  names = list(dict.fromkeys(b for bars in groups.values() for b in bars))
  colour = {n: (colours or {}).get(n, PALETTE[j % len(PALETTE)]) for j, n in enumerate(names)}
  values = [v for bars in groups.values() for v in bars.values() if np.isfinite(v)]
  top = ymax if ymax is not None else max(values + [1e-9]) * 1.1
  yticks = nice_ticks(0.0, top)
  f = font(11)
  img, box, f = _canvas(size, title, '', ylabel,
                        max(_text_size(t, f)[0] for t in tick_labels(yticks)), top=48)
  n = max(len(groups), 1)
  ax = _Axes(img, box, (0.0, float(n)), (0.0, top))
  ax.frame([i + 0.5 for i in range(len(groups))], [v for v in yticks if v <= top], f,
           xlabels=list(groups))
  width = 0.8 / max(len(names), 1)
  for g, bars in enumerate(groups.values()):
    for j, name in enumerate(names):
      v = bars.get(name, float('nan'))
      if not np.isfinite(v):
        continue
      (xa, ya), (xb, yb) = ax.px(g + 0.1 + j * width, v), ax.px(g + 0.1 + (j + 1) * width, 0)
      ax.draw.rectangle([xa + 1, ya, xb - 1, yb], fill=colour[name])
      text = fmt.format(v)
      w, h = _text_size(text, f)
      ax.draw.text(((xa + xb - w) / 2, ya - h - 5), text, fill=BLACK, font=f)
  ax.legend([(name, colour[name], False) for name in names], f, row=True)
  return img
