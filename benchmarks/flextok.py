r"""FlexTok: tokenizer training-step throughput and MFU, and decoding (rectified-flow sampling)
images/s against the number of Euler steps.

  python benchmarks/flextok.py                                      # tiny and demo (CPU)
  python benchmarks/flextok.py --configs d18-d28 --batch 32 --dtype bfloat16   # on a GPU

The KL-VAE is an untrained configs/kl_vae.py variant (the same name for tiny and demo,
f8c16 for the paper's) built with random weights (`vae.random_init`): timings do not
depend on the weights, and no trained VAE is needed. Batches are synthetic.

Training: the trainer's compiled step (frozen VAE encoder, FlexTok encoder, nested dropout,
one decoder pass on noised latents); FLOPs count the encoder and decoder forward x3, not the
VAE's. Decoding: one jitted `detokenize` of --decode_batch images from all N tokens with
the config's guidance (APG doubles the decoder batch), for each --decode_steps; images/s =
batch / call time, and the FLOPs per image count encoder-free decoding (steps x decoder
passes) plus nothing for the VAE decoder.
"""
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, train_step  # noqa: E402
from jaxgen import trainer  # noqa: E402


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'flextok')
  common.add_train_args(p, 'tiny,demo', 'configs/flextok.py variants',
                        'model.num_registers=16')
  p.add_argument('--decode_steps', default='1,5,25', help='Euler step counts to time')
  p.add_argument('--decode_batch', type=int, default=16)
  p.add_argument('--repeats', type=int, default=3)
  return common.fill_defaults(p.parse_args(argv), batch=(64, 32), warmup=(2, 2))


def vae_variant(variant):
  """The configs/kl_vae.py variant whose latents the FlexTok variant is sized for."""
  return variant if variant in ('tiny', 'demo') else 'f8c16'


def bench_decode(exp, params, label, num_steps, args, ceilings, peak):
  """One row: `exp`'s detokenize from all N tokens over `num_steps` Euler steps."""
  fam, config = exp.family, exp.config
  b = args.decode_batch
  ids = jax.random.randint(jax.random.PRNGKey(0), (b, config.model.num_registers), 0,
                           fam.num_codes)
  fn = jax.jit(lambda p, i, r: fam.detokenize(p, i, r, num_steps=num_steps))
  with exp.context():
    compiled, compile_s = common.timed_compile(fn, params, ids, jax.random.PRNGKey(1))
    stats = common.time_calls(lambda: compiled(params, ids, jax.random.PRNGKey(2)),
                              args.repeats)
  config.sample.num_steps = num_steps
  sampler_flops = fam.flops_per_example(train=False) - fam.flops_per_example(encode_only=True)
  achieved = sampler_flops * b / stats['median_s']
  return {'config': label, 'dtype': args.dtype, 'guidance': config.sample.guidance,
          'euler_steps': num_steps, 'batch': b, 'compile_s': compile_s,
          'call_ms': 1e3 * stats['median_s'], 'images_per_s': b / stats['median_s'],
          'ms_per_euler_step': 1e3 * stats['median_s'] / num_steps,
          'mfu_measured': common.ratio(achieved, ceilings.get(args.dtype,
                                                              ceilings['float32'])),
          'mfu_peak': common.ratio(achieved, peak)}


DECODE_COLUMNS = (('config', 'model'), ('guidance', 'guidance'), ('euler_steps', 'steps'),
                  ('batch', 'batch'), ('compile_s', 'compile s'), ('call_ms', 'call ms'),
                  ('ms_per_euler_step', 'ms/step'), ('images_per_s', 'img/s'),
                  ('mfu_measured', 'MFU'))


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  train_rows, decode_rows = [], []
  for variant in common.parse_configs(args.configs):
    overrides = [f'vae.random_init={vae_variant(variant)}'] + args.set
    config = train_step.make_config(variant, args.batch, args.dtype, args.warmup + args.steps,
                                    'flextok', overrides)
    label = ' '.join([variant] + args.set)
    train_rows.append(train_step.measure(config, label, args, ceilings,
                                         machine['peak_bf16_flops']))
    print(f"  {variant}: {train_rows[-1]['step_ms_median']:.1f} ms/step, "
          f"{train_rows[-1]['images_per_s']:.1f} img/s, MFU "
          f"{train_rows[-1]['mfu_measured']:.3f}", flush=True)
    # One model (and untrained VAE) for every step count: only the sampler differs.
    exp = trainer.Experiment(config.copy_and_resolve_references(), workdir=None)
    params = exp.init_state().ema_params
    for num_steps in (int(s) for s in args.decode_steps.split(',') if s):
      row = bench_decode(exp, params, label, num_steps, args, ceilings,
                         machine['peak_bf16_flops'])
      decode_rows.append(row)
      print(f"  {variant} decode {num_steps} steps: {row['images_per_s']:.1f} img/s", flush=True)
  print(common.format_table(train_rows, train_step.COLUMNS))
  print(common.format_table(decode_rows, DECODE_COLUMNS))
  common.write_json(args.out, train_rows + decode_rows, machine, args)


if __name__ == '__main__':
  main()
