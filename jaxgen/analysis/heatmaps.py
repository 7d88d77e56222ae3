"""Labelled heat maps drawn with PIL + NumPy (no matplotlib): matrices, spatial maps, stacking.

Every function returns a `PIL.Image` (RGB); `np.asarray(image)` gives the uint8 array that
`jaxgen.writers.save_png` writes.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchor colours of a perceptually ordered dark-blue -> teal -> green -> yellow ramp
# (monotone in lightness), linearly interpolated in between.
_ANCHORS = np.array([[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132],
                     [122, 209, 81], [253, 231, 37]], np.float64)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def colormap(values, vmin=0.0, vmax=1.0):
  """Array of any shape -> uint8 [..., 3] colours; NaN -> light grey."""
  v = np.asarray(values, np.float64)
  span = vmax - vmin if vmax > vmin else 1.0
  x = np.clip((np.nan_to_num(v, nan=vmin) - vmin) / span, 0, 1) * (len(_ANCHORS) - 1)
  lo = np.minimum(np.floor(x).astype(int), len(_ANCHORS) - 2)
  frac = (x - lo)[..., None]
  rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
  rgb = np.where(np.isnan(v)[..., None], 220.0, rgb)
  return np.round(rgb).astype(np.uint8)


def font(size=11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _text_size(text, f):
  left, top, right, bottom = f.getbbox(str(text))
  return right - left, bottom - top


def _fmt(v):
  return f'{v:.2f}' if abs(v) < 10 else f'{v:.0f}'


def heatmap(values, *, title, row_labels, col_labels, cell=(18, 16), vmin=0.0, vmax=None,
            annotate=False, label_every=1, xlabel=''):
  """A [R, C] matrix as coloured cells with row/column labels, a title and a colour bar.

  Column labels are drawn vertically when they do not fit a cell; only every
  `label_every`-th column is labelled. `annotate` writes each value into its cell."""
  v = np.asarray(values, np.float64)
  rows, cols = v.shape
  vmax = float(np.nanmax(v)) if vmax is None else vmax
  vmax = vmax if vmax > vmin else vmin + 1.0
  f, ft = font(11), font(13)
  cw, ch = cell
  row_w = max([_text_size(r, f)[0] for r in row_labels] + [0]) + 8
  col_sizes = [_text_size(c, f) for c in col_labels]
  vertical = any(w > cw * label_every - 2 for w, _ in col_sizes)
  col_h = (max([w for w, _ in col_sizes] + [0]) if vertical else 12) + 8
  title_h, xlab_h, bar_w = 22, 16 if xlabel else 0, 60
  width = row_w + cols * cw + bar_w + 10
  height = title_h + rows * ch + col_h + xlab_h + 6
  img = Image.new('RGB', (max(width, _text_size(title, ft)[0] + 10), height), WHITE)
  draw = ImageDraw.Draw(img)
  draw.text((4, 4), title, fill=BLACK, font=ft)
  x0, y0 = row_w, title_h
  cells = np.kron(colormap(v, vmin, vmax), np.ones((ch, cw, 1), np.uint8))
  img.paste(Image.fromarray(cells), (x0, y0))
  for r, label in enumerate(row_labels):
    w, h = _text_size(label, f)
    draw.text((x0 - w - 4, y0 + r * ch + (ch - h) // 2 - 2), str(label), fill=BLACK, font=f)
  for c, label in enumerate(col_labels):
    if c % label_every:
      continue
    w, h = col_sizes[c]
    if vertical:
      tile = Image.new('RGB', (w + 2, h + 6), WHITE)
      ImageDraw.Draw(tile).text((0, 0), str(label), fill=BLACK, font=f)
      tile = tile.rotate(90, expand=True)
      img.paste(tile, (x0 + c * cw + (cw - tile.width) // 2, y0 + rows * ch + 4))
    else:
      draw.text((x0 + c * cw + (cw - w) // 2, y0 + rows * ch + 4), str(label), fill=BLACK, font=f)
  if xlabel:
    w, _ = _text_size(xlabel, f)
    draw.text((x0 + (cols * cw - w) // 2, y0 + rows * ch + col_h), xlabel, fill=BLACK, font=f)
  if annotate:
    for r in range(rows):
      for c in range(cols):
        if np.isnan(v[r, c]):
          continue
        text = _fmt(v[r, c])
        w, h = _text_size(text, f)
        light = (v[r, c] - vmin) / (vmax - vmin) > 0.6
        draw.text((x0 + c * cw + (cw - w) // 2, y0 + r * ch + (ch - h) // 2 - 2), text,
                  fill=BLACK if light else WHITE, font=f)
  _colour_bar(img, draw, f, (x0 + cols * cw + 8, y0), max(rows * ch, 40), vmin, vmax)
  return img


def _colour_bar(img, draw, f, origin, height, vmin, vmax):
  x, y = origin
  ramp = colormap(np.linspace(vmax, vmin, height)[:, None], vmin, vmax)
  img.paste(Image.fromarray(np.repeat(ramp, 10, axis=1)), (x, y))
  draw.text((x + 13, y - 2), _fmt(vmax), fill=BLACK, font=f)
  draw.text((x + 13, y + height - 12), _fmt(vmin), fill=BLACK, font=f)


def spatial_maps(maps, *, title, labels, tile=40, vmin=0.0, vmax=None):
  """[N, g, g] maps (one per expert) side by side on one shared colour scale."""
  m = np.asarray(maps, np.float64)
  n, g = m.shape[0], m.shape[1]
  vmax = float(np.nanmax(m)) if vmax is None else vmax
  vmax = vmax if vmax > vmin else vmin + 1.0
  f, ft = font(11), font(13)
  scale = max(1, tile // g)
  side, gap, title_h = g * scale, 8, 22
  img = Image.new('RGB', (max(n * (side + gap) + 70, _text_size(title, ft)[0] + 10),
                          title_h + side + 20), WHITE)
  draw = ImageDraw.Draw(img)
  draw.text((4, 4), title, fill=BLACK, font=ft)
  for i in range(n):
    x = 4 + i * (side + gap)
    pix = np.kron(colormap(m[i], vmin, vmax), np.ones((scale, scale, 1), np.uint8))
    img.paste(Image.fromarray(pix), (x, title_h))
    w, _ = _text_size(labels[i], f)
    draw.text((x + (side - w) // 2, title_h + side + 3), str(labels[i]), fill=BLACK, font=f)
  _colour_bar(img, draw, f, (4 + n * (side + gap) + 4, title_h), side, vmin, vmax)
  return img


def text_block(lines, width=600):
  f = font(12)
  img = Image.new('RGB', (width, 8 + 16 * len(lines)), WHITE)
  draw = ImageDraw.Draw(img)
  for i, line in enumerate(lines):
    draw.text((6, 4 + 16 * i), line, fill=BLACK, font=f)
  return img


def stack(images, pad=12):
  """Images one below the other on white, left-aligned."""
  width = max(im.width for im in images) + 2 * pad
  height = sum(im.height for im in images) + pad * (len(images) + 1)
  out = Image.new('RGB', (width, height), WHITE)
  y = pad
  for im in images:
    out.paste(im, (pad, y))
    y += im.height + pad
  return out


# ----------------------------------------------------------------------------- routing report


def layer_figure(result, li):
  """One MoE layer: p(expert | timestep / class / position) and per-expert spatial maps."""
  st, name = result['stats'], result['layers'][li]
  dep, freq, counts = st['summary']['dependence'], st['frequency'], st['counts']
  e, side = result['num_experts'], result['grid']
  experts = [f'e{i}' for i in range(e)]
  vmax = max(float(freq[k][li].max()) for k in ('timestep', 'position', 'class'))
  floor = lambda f: f' (permutation floor {dep[f + "_null"][li]:.3f})' if f + '_null' in dep else ''
  title = lambda f: f'{name}: p(expert | {f}), dependence {dep[f][li]:.3f}{floor(f)}'
  by_class = np.where(counts['class'][li].sum(0) > 0, freq['class'][li], np.nan)  # grey: unseen
  num_classes, num_pos = by_class.shape[1], side * side
  return stack([
      heatmap(freq['timestep'][li], title=title('timestep'), row_labels=experts,
              col_labels=[f'{t:.2f}' for t in result['timesteps']], cell=(34, 16), vmax=vmax,
              xlabel='t (0 = data, 1 = noise)'),
      heatmap(by_class, title=title('class'), row_labels=experts,
              col_labels=result['class_names'], cell=(max(3, min(34, 900 // num_classes)), 16),
              vmax=vmax, label_every=-(-num_classes // 40)),
      heatmap(freq['position'][li], title=title('position'), row_labels=experts,
              col_labels=[str(i) for i in range(num_pos)],
              cell=(max(3, min(18, 720 // num_pos)), 16), vmax=vmax, label_every=side,
              xlabel=f'patch index (row-major {side}x{side} grid)'),
      spatial_maps(freq['position'][li].reshape(e, side, side), labels=experts, tile=48,
                   vmax=vmax, title=f'{name}: p(expert | position) on the {side}x{side} '
                   'patch grid, one map per expert'),
  ])


def summary_figure(result):
  """The summary numbers across MoE layers: dependence, evenness, per-timestep maps."""
  s = result['stats']['summary']
  layers, dep, half = s['layers'], s['dependence'], s['by_time_half']
  t_labels = [f'{t:.2f}' for t in result['timesteps']]
  spec = np.asarray(s['specialisation_by_timestep'])
  pos_t = np.asarray(s['position_dependence_by_timestep'])
  hmax = max(float(spec.max()), float(pos_t.max()), 1e-6)
  small = len(t_labels) <= 16
  pos_floor = ''
  if 'position_dependence_by_timestep_null' in s:
    pos_floor = f' (floor {np.mean(s["position_dependence_by_timestep_null"]):.3f})'
  lines = [f'step {result.get("step", "?")}: {s["num_images"]} test images x {len(t_labels)} '
           f'times, {result["objective"]}, {result["num_experts"]} experts, '
           f'top-{result["top_k"]}; mean over layers:',
           '  dependence ' + ', '.join(f'{k} {v:.3f}' for k, v in s['dependence_mean'].items()),
           '  specialisation ' + ', '.join(f'{k} {v}' for k, v in half['specialisation'].items())
           + '; position dependence ' + ', '.join(
               f'{k} {v}' for k, v in half['position_dependence'].items())]
  return stack([
      text_block(lines, width=760),
      heatmap(np.array(list(dep.values())).T, title='(i) expert-choice dependence on each '
              'factor (mean TV; _null = permutation floor)', row_labels=layers,
              col_labels=list(dep), cell=(84, 18), annotate=True),
      heatmap(np.asarray(s['evenness'])[:, None], title='(ii) load evenness (entropy / log E)',
              row_labels=layers, col_labels=['evenness'], cell=(84, 18), vmin=0.0, vmax=1.0,
              annotate=True),
      heatmap(spec, title='(iii) specialisation per timestep: TV(p(e | t), uniform)',
              row_labels=layers, col_labels=t_labels, cell=(40, 18), vmax=hmax, annotate=small,
              xlabel='t (0 = data, 1 = noise)'),
      heatmap(pos_t, title=f'(iii) position dependence within each timestep{pos_floor}',
              row_labels=layers, col_labels=t_labels, cell=(40, 18), vmax=hmax, annotate=small,
              xlabel='t (0 = data, 1 = noise)'),
  ])
