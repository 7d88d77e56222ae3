"""Per-image reconstruction metrics on NHWC batches: PSNR and SSIM (Wang et al. 2004).

Inputs are in [-1, 1] by default (the codebase's image range), so `data_range` = 2; pass
data_range=1 or 255 for other ranges. Both functions are jittable and return one value per image.
"""
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import UserError


def _check_pair(x, y, name):
  if x.ndim != 4 or x.shape != y.shape:
    raise UserError(f'{name}: need two NHWC batches of one shape, got {x.shape} and {y.shape}')
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def psnr(x, y, data_range=2.0):
  """Peak signal-to-noise ratio in dB per image [B]; inf for identical images."""
  x, y = _check_pair(x, y, 'psnr')
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(size=11, sigma=1.5):
  """Normalised 1-D Gaussian taps; SSIM's 2-D window is their outer product."""
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-t ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter_valid(x, taps):
  """Separable 'valid' correlation over H and W of [B, H, W, C], as sums of shifted slices.

  Slices (not conv) keep full float32 precision on every backend and need no channel grouping.
  """
  n = len(taps)
  h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
  x = sum(float(t) * x[:, i:i + h] for i, t in enumerate(taps))
  return sum(float(t) * x[:, :, i:i + w] for i, t in enumerate(taps))


def ssim(x, y, data_range=2.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
  """Structural similarity per image [B]: Gaussian-window SSIM map ('valid' region, per channel),
  averaged over the map and the channels. 1 for identical images."""
  x, y = _check_pair(x, y, 'ssim')
  if min(x.shape[1:3]) < window:
    raise UserError(f'ssim: images of {x.shape[1]}x{x.shape[2]} are smaller than the '
                    f'{window}x{window} window; pass a smaller window= or larger images')
  taps = gaussian_window(window, sigma)
  f = lambda v: _filter_valid(v, taps)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mx, my = f(x), f(y)
  vx = f(x * x) - mx * mx
  vy = f(y * y) - my * my
  cxy = f(x * y) - mx * my
  num = (2 * mx * my + c1) * (2 * cxy + c2)
  den = (mx * mx + my * my + c1) * (vx + vy + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))
