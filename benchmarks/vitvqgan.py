r"""ViT-VQGAN tokenizer training-step throughput and MFU (generator + StyleGAN2 discriminator in
the trainer's one compiled step), and VIM's autoregressive decoding with and without the KV
cache.

  python benchmarks/vitvqgan.py                           # tiny and demo (Fashion-MNIST 32px)
  python benchmarks/vitvqgan.py --configs SS --batch 32 --dtype bfloat16     # on a GPU

Decoding: configs/vim.py:demo's model shape over --ar_tokens image tokens (default 256, a
16x16 token grid) and 512 codes, --ar_batch class labels per call, temperature 1 with a fixed
key; one call of the jitted vim.generate(cached=True) against the uncached reference, which
recomputes the whole causal buffer per token. tokens/s = batch * tokens / call time.

Synthetic batches replace the dataset; the step is the trainer's (train_state.make_train_step
with the family's two optimizers), compiled ahead of time and timed as in
benchmarks/train_step.py. The discriminator is on (step >= loss.disc_start is forced by
setting disc_start=0), so every timed step pays for the adversarial terms; R1 runs on one
step in loss.r1_every, as in training. FLOPs count the generator forward, three
discriminator forwards (real, fake for D, fake for G), x3 for the backward pass; R1's
double backward is not counted. The perceptual loss is off unless --perceptual (it needs the
Fashion-MNIST classifier, or LPIPS weights for the paper sizes).
"""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, train_step  # noqa: E402


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'vitvqgan')
  common.add_train_args(p, 'tiny,demo', 'configs/vitvqgan.py variants', 'model.code_dim=8',
                        steps=16, steps_help='timed steps after warm-up (one R1 step per '
                        'loss.r1_every)')
  p.add_argument('--perceptual', action='store_true', help="keep the config's perceptual loss")
  p.add_argument('--ar_tokens', type=int, default=256, help='image tokens decoded by VIM')
  p.add_argument('--ar_batch', type=int, default=8)
  p.add_argument('--ar_repeats', type=int, default=2)
  p.add_argument('--no_ar', action='store_true', help='tokenizer rows only')
  return common.fill_defaults(p.parse_args(argv), batch=(64, 16), warmup=(2, 2))


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  rows = []
  for variant in common.parse_configs(args.configs):
    overrides = ['loss.disc_start=0'] + ([] if args.perceptual else
                                         ['loss.perceptual_weight=0.0']) + args.set
    config = train_step.make_config(variant, args.batch, args.dtype, args.warmup + args.steps,
                                    'vitvqgan', overrides)
    rows.append(train_step.measure(config, variant, args, ceilings, machine['peak_bf16_flops']))
    print(f"  {variant}: {rows[-1]['step_ms_median']:.1f} ms/step, "
          f"{rows[-1]['images_per_s']:.1f} img/s, MFU {rows[-1]['mfu_measured']:.3f}", flush=True)
  if not args.no_ar:
    for cached in (True, False):
      rows.append(bench_decode(args, cached))
      print(f"  vim decode ({rows[-1]['sampler']}): {rows[-1]['tokens_per_s']:.0f} tok/s",
            flush=True)
    rows[-2]['cache_speedup'] = rows[-2]['tokens_per_s'] / rows[-1]['tokens_per_s']
    rows[-1]['cache_speedup'] = rows[-2]['cache_speedup']
  tokenizer_rows = [r for r in rows if 'sampler' not in r]
  print(common.format_table(tokenizer_rows, train_step.COLUMNS))
  if not args.no_ar:
    print(common.format_table([r for r in rows if 'sampler' in r], DECODE_COLUMNS))
  common.write_json(args.out, rows, machine, args)


DECODE_COLUMNS = (('config', 'model'), ('sampler', 'sampler'), ('batch', 'batch'),
                  ('tokens', 'tokens'), ('compile_s', 'compile s'), ('call_ms', 'call ms'),
                  ('tokens_per_s', 'tok/s'), ('cache_speedup', 'cache speed-up'))


def bench_decode(args, cached):
  from jaxgen.config_base import load_config
  from jaxgen.models import vim
  m = load_config('configs/vim.py', 'demo').model
  model = vim.VIM(num_codes=512, num_classes=10, max_len=args.ar_tokens + 1, width=m.width,
                  depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout=0.0)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  labels = jnp.arange(args.ar_batch, dtype=jnp.int32) % 10
  fn = jax.jit(lambda p, r: vim.generate(model, p, labels, r, cached=cached))
  compiled, compile_s = common.timed_compile(fn, params, jax.random.PRNGKey(0))
  stats = common.time_calls(lambda: compiled(params, jax.random.PRNGKey(1)), args.ar_repeats)
  return {'config': f'vim demo {m.width}x{m.depth}', 'sampler': 'kv_cache' if cached else
          'uncached', 'batch': args.ar_batch, 'tokens': args.ar_tokens, 'compile_s': compile_s,
          'call_ms': 1e3 * stats['median_s'],
          'tokens_per_s': args.ar_batch * args.ar_tokens / stats['median_s']}


if __name__ == '__main__':
  main()
