r"""Language-model training-step throughput / MFU and KV-cache decoding throughput.

  python benchmarks/lm.py                               # tiny and 150M (seq 128, batch 4) on CPU
  python benchmarks/lm.py --configs 150M --steps 3 --new_tokens 32     # a quick CPU look
  python benchmarks/lm.py --configs 150M --dtype bfloat16 --decode_batch 64 --uncached   # GPU

For each configs/lexinvariant.py variant in --configs and embedding mode in --modes:

  training  the trainer's step (trainer.Experiment + train_state.make_train_step), compiled
            ahead of time (reported separately) and timed on synthetic batches of random
            tokens {'inputs', 'targets'} int32 [batch, seq_len] (no dataset needed). MFU uses
            the analytic family.flops_per_example(train=True) against the matmul ceiling
            measured in the same run and, on a known GPU with --dtype bfloat16, its bf16 peak.
  decoding  the jitted family.generate(params, prompts, new_tokens, rng) with the KV cache
            (cached=True) for --decode_batch random prompts of --prompt_len tokens; one call
            is the prefill plus new_tokens sampled tokens, so ms/token = call time / new
            tokens and tokens/s = decode_batch * new_tokens / call time (--prefill also
            times a prefill-only call, new_tokens=1, and reports the rate of the remaining
            one-token decode steps, decode_batch / ((call - prefill) / (new - 1))). The uncached
            reference (cached=False, the whole buffer recomputed per token) is timed too for
            the tiny variant, or for every variant with --uncached, giving the cache's speed-up.

On CPU the 150M variant runs at --seq_len 128 and --batch 4 unless given (the 150M-shape
model at a short sequence); elsewhere the config's batch and length.
"""
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks.train_step import make_config  # noqa: E402
from jaxgen import trainer  # noqa: E402

MIN_TIME_S = 1.0  # fast steps and decode calls repeat until this much time is measured
CPU_SHAPES = {'150M': (4, 128)}  # variant -> (batch, seq_len) on CPU when not given

TRAIN_COLUMNS = (
    ('config', 'config'), ('dtype', 'dtype'), ('batch', 'batch'), ('seq_len', 'seq'),
    ('params', 'params'), ('compile_s', 'compile s'), ('step_ms_median', 'step ms (med)'),
    ('step_ms_mean', 'step ms (mean)'), ('tokens_per_s', 'tok/s'),
    ('train_gflops_per_step', 'GFLOP/step'), ('achieved_tflops', 'TFLOP/s'),
    ('mfu_measured', 'MFU (measured)'), ('mfu_peak', 'MFU (bf16 peak)'),
    ('peak_memory_mib', 'peak mem MiB'),
)
DECODE_COLUMNS = (
    ('config', 'config'), ('sampler', 'sampler'), ('dtype', 'dtype'), ('batch', 'batch'),
    ('prompt_len', 'prompt'), ('new_tokens', 'new'), ('compile_s', 'compile s'),
    ('call_ms', 'call ms'), ('ms_per_token', 'ms/token'), ('tokens_per_s', 'tok/s'),
    ('prefill_ms', 'prefill ms'), ('decode_tokens_per_s', 'tok/s w/o prefill'),
    ('cache_speedup', 'cache speed-up'), ('peak_memory_mib', 'peak mem MiB'),
)


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'lm')
  common.add_train_args(p, 'tiny,150M', 'configs/lexinvariant.py variants (tiny, demo, 150M), '
                        'comma-separated', 'model.position=rope',
                        steps_help='timed training steps after warm-up (at least; fast ones '
                        'repeat for 1 s)')
  p.add_argument('--modes', default='lexinvariant,standard',
                 help='embedding modes (lexinvariant, standard, semi), comma-separated')
  p.add_argument('--seq_len', type=int, default=None,
                 help="training sequence length (default: the config's; 128 for 150M on CPU)")
  p.add_argument('--decode_batch', type=int, default=None,
                 help='prompts per decoding call (default: 32 on an accelerator, 4 on CPU)')
  p.add_argument('--prompt_len', type=int, default=None,
                 help='prompt tokens (default: 128 on an accelerator, 32 on CPU)')
  p.add_argument('--new_tokens', type=int, default=None,
                 help='tokens generated per call (default: 256 on an accelerator, 64 on CPU)')
  p.add_argument('--decode_repeats', type=int, default=None,
                 help='timed decoding calls after one warm-up call (at least; fast ones '
                      'repeat for 1 s) (default: 5 on an accelerator, 2 on CPU)')
  p.add_argument('--prefill', action='store_true',
                 help='also time a prefill-only call (new_tokens=1) of the KV-cache sampler, '
                      'to report the incremental decode rate without the prefill')
  p.add_argument('--uncached', action='store_true',
                 help='also time the uncached reference sampler for non-tiny variants')
  p.add_argument('--no_decode', action='store_true', help='training rows only')
  # --batch stays None for the config's own (4 for 150M on CPU: see lm_config).
  return common.fill_defaults(p.parse_args(argv), warmup=(2, 1), decode_batch=(32, 4),
                              prompt_len=(128, 32), new_tokens=(256, 64),
                              decode_repeats=(5, 2))


def split_list(text):
  return [t.strip() for t in text.split(',') if t.strip()]


def lm_config(variant, mode, args):
  """configs/lexinvariant.py:<variant>,<mode> with the benchmark's batch, length and dtype."""
  base = common.load_config_module('lexinvariant').get_config(f'{variant},{mode}')
  cpu_batch, cpu_len = (None, None)
  if not common.on_accelerator():
    cpu_batch, cpu_len = CPU_SHAPES.get(variant, (None, None))
  batch = args.batch or cpu_batch or base.batch_size
  config = make_config(f'{variant},{mode}', batch, args.dtype, args.warmup + args.steps,
                       'lexinvariant', args.set)
  config.data.seq_len = args.seq_len or cpu_len or config.data.seq_len
  return config


def measure_train(exp, label, args, ceilings, peak):
  """Compiles and times the trainer's step; (row, final state)."""
  config = exp.config
  state = exp.init_state()
  params = common.param_count(state.params)
  print(f'  {label}: {params:,} parameters', flush=True)
  stats, compile_s, metrics, state = common.time_train_step(
      exp, state, args.steps, warmup=args.warmup, min_time_s=MIN_TIME_S)
  loss = float(metrics['loss'])  # the last timed step's
  tokens = config.batch_size * config.data.seq_len
  flops = exp.family.flops_per_example(train=True) * config.batch_size
  achieved = flops / stats['median_s']
  ceiling = ceilings.get(args.dtype, ceilings['float32'])
  mem, mem_source = common.peak_memory()
  row = {
      'bench': 'train', 'config': label, 'dtype': args.dtype, 'batch': config.batch_size,
      'seq_len': config.data.seq_len, 'params': params, 'compile_s': compile_s,
      'step_ms_median': 1e3 * stats['median_s'], 'step_ms_mean': 1e3 * stats['mean_s'],
      'step_ms_min': 1e3 * stats['min_s'], 'tokens_per_s': tokens / stats['median_s'],
      'train_gflops_per_step': flops / 1e9, 'achieved_tflops': achieved / 1e12,
      'mfu_measured': common.ratio(achieved, ceiling),
      'mfu_measured_ceiling_dtype': args.dtype if args.dtype in ceilings else 'float32',
      'mfu_peak': common.ratio(achieved, peak) if args.dtype == 'bfloat16' else None,
      'peak_memory_mib': mem / 2 ** 20, 'peak_memory_source': mem_source,
      'final_loss': loss, 'steps_timed': len(stats['times_s']), 'step_times_s': stats['times_s'],
  }
  print(f"  {label}: train {row['step_ms_median']:.1f} ms/step, "
        f"{row['tokens_per_s']:,.0f} tok/s, MFU {row['mfu_measured']:.3f}", flush=True)
  return row, state


def time_generate(exp, params, prompts, num_new, cached, repeats):
  """Compiles and times the jitted family.generate for `num_new` tokens; (compile s, stats)."""
  family = exp.family
  rng = jax.random.PRNGKey(exp.config.sample.seed)
  # As Experiment.write_samples jits the family's sampler: replicated output.
  generate = jax.jit(lambda p, x, r: family.generate(p, x, num_new, r, cached=cached),
                     out_shardings=NamedSharding(exp.mesh, P()))
  with exp.context():
    compiled, compile_s = common.timed_compile(generate, params, prompts, rng)
    stats = common.time_calls(lambda: compiled(params, prompts, rng), repeats, warmup=1,
                              min_time_s=MIN_TIME_S)
  return compile_s, stats


def measure_decode(exp, params, label, cached, args):
  """Times one generate call (prefill + new_tokens sampled tokens) on random prompts."""
  n = args.new_tokens
  prompts = jax.random.randint(jax.random.PRNGKey(1), (args.decode_batch, args.prompt_len),
                               0, exp.config.data.vocab_size, dtype=np.int32)
  compile_s, stats = time_generate(exp, params, prompts, n, cached, args.decode_repeats)
  call_s = stats['median_s']
  prefill_s = incremental_s = None
  if cached and args.prefill and n > 1:  # prefill + 1 token: the rest is n - 1 decode steps
    _, prefill = time_generate(exp, params, prompts, 1, cached, args.decode_repeats)
    prefill_s = prefill['median_s']
    incremental_s = (call_s - prefill_s) / (n - 1)
  mem, mem_source = common.peak_memory()
  row = {
      'bench': 'decode', 'config': label, 'sampler': 'kv_cache' if cached else 'uncached',
      'dtype': args.dtype, 'batch': args.decode_batch, 'prompt_len': args.prompt_len,
      'new_tokens': n, 'compile_s': compile_s, 'call_ms': 1e3 * call_s,
      'call_ms_mean': 1e3 * stats['mean_s'], 'ms_per_token': 1e3 * call_s / n,
      'tokens_per_s': args.decode_batch * n / call_s, 'cache_speedup': None,
      'prefill_ms': None if prefill_s is None else 1e3 * prefill_s,
      'decode_ms_per_step': None if incremental_s is None else 1e3 * incremental_s,
      'decode_tokens_per_s': common.ratio(args.decode_batch, incremental_s),
      'peak_memory_mib': mem / 2 ** 20, 'peak_memory_source': mem_source,
      'calls_timed': len(stats['times_s']),
  }
  print(f"  {label}: decode ({row['sampler']}) {row['ms_per_token']:.2f} ms/token, "
        f"{row['tokens_per_s']:,.0f} tok/s", flush=True)
  return row


def bench_config(variant, mode, args, ceilings, peak):
  config = lm_config(variant, mode, args)
  label = ' '.join([f'{variant},{mode}'] + args.set)
  exp = trainer.Experiment(config, workdir=None)
  train_row, state = measure_train(exp, label, args, ceilings, peak)
  decode_rows = []
  if not args.no_decode:
    params = state.params
    decode_rows.append(measure_decode(exp, params, label, True, args))
    if variant == 'tiny' or args.uncached:
      decode_rows.append(measure_decode(exp, params, label, False, args))
      speedup = decode_rows[1]['call_ms'] / decode_rows[0]['call_ms']
      for row in decode_rows:
        row['cache_speedup'] = speedup
  return train_row, decode_rows


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  train_rows, decode_rows = [], []
  for variant in split_list(args.configs):
    for mode in split_list(args.modes):
      train_row, rows = bench_config(variant, mode, args, ceilings, machine['peak_bf16_flops'])
      train_rows.append(train_row)
      decode_rows.extend(rows)
  print('\ntraining')
  print(common.format_table(train_rows, TRAIN_COLUMNS))
  if decode_rows:
    print('\ndecoding')
    print(common.format_table(decode_rows, DECODE_COLUMNS))
  common.write_json(args.out, train_rows + decode_rows, machine, args)


if __name__ == '__main__':
  main()
