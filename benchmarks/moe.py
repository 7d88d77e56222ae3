r"""DiT-MoE dispatch benchmark: dropless vs capacity vs dense-all-experts, and a FLOP-matched dense DiT.

  python benchmarks/moe.py                         # S width (384), 8E2A, batch 16 on CPU
  python benchmarks/moe.py --batch 8               # smaller: the optimizer's share grows
  python benchmarks/moe.py --depth 12 --batch 64   # the full S depth, on a GPU

The MoE model is S-width (384, 6 heads) with 8 routed SwiGLU experts (top-2, hidden 4D) and
2 shared experts, on the 32x32x1 Fashion-MNIST shape with patch 4 (64 tokens). Two dense
references match the MoE's activated FLOPs per token (router + 2 experts + shared:
30 D^2 + 8 D multiply-adds): the same DiT with a SwiGLU MLP of hidden 10 D (the experts' own
MLP kind, so the ratio isolates the cost of sparse dispatch) and with DiT's GELU MLP of
ratio 15 (which runs faster per FLOP than SwiGLU: two larger matmuls instead of three).
Dropless runs with each grouped matmul: 'windows' (the default; whether the router's loads
needed the spill or the fallback to 'blocks' is reported as moe_window_spill and
moe_window_overflow, with moe_max_load), 'blocks' alone, and 'ragged_dot'.
The MoE rows are timed from a state trained --settle steps first (capacity dispatch, the
same synthetic batches): a fresh router sends most tokens to a few experts (max load 3.4 x the
mean at init, 1.2-1.5 after 100 steps of the balance loss), which training leaves behind.
Reported: step time of each, MoE / FLOP-matched dense ratios, dense-all-experts slowdown.
The same ratios for one layer alone (forward + backward of the MoE layer against the SwiGLU MLP
of hidden 10 D on the same tokens) separate the dispatch cost from what a whole step adds per
parameter: AdamW and the EMA read and write all 8 experts' weights every step, the MoE has
2.7x the dense model's parameters, and on a CPU that memory traffic is not hidden: at batch 8
(512 tokens) on 2 cores AdamW costs the MoE step 60-80 ms more than SGD, the dense step 10-30.
"""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common, train_step  # noqa: E402
from jaxgen import trainer  # noqa: E402
from jaxgen.models import layers, moe  # noqa: E402

COLUMNS = (('config', 'config'), ('batch', 'batch'), ('params', 'params'),
           ('train_gflops_per_step', 'GFLOP/step'), ('compile_s', 'compile s'),
           ('step_ms_median', 'step ms (med)'), ('images_per_s', 'img/s'),
           ('mfu_measured', 'MFU (measured)'), ('vs_dense', 'x dense SwiGLU'),
           ('vs_dense_gelu', 'x dense GELU'), ('moe_max_load', 'max load'),
           ('moe_window_spill', 'spilled'), ('moe_window_overflow', 'fell back'))


def parse_args(argv=None):
  p = common.arg_parser(__doc__, 'moe')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--depth', type=int, default=2, help='blocks (S has 12; 2 keeps CPU runs short)')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--settle', type=int, default=150,
                 help='training steps before the MoE rows are timed (0: time from init)')
  return p.parse_args(argv)


def settled_state(args):
  """The MoE state after `args.settle` capacity-dispatch steps (all dispatches share it)."""
  exp = trainer.Experiment(make_config(args, 'capacity'), workdir=None)
  state = exp.init_state()
  if args.settle:
    _, _, metrics, state = common.time_train_step(exp, state, args.settle, warmup=0)
    print(f"  settled {args.settle} steps: max expert load {float(metrics['moe_max_load']):.2f}"
          ' x the mean', flush=True)
  return state


DENSE = {'gelu': 15.0, 'swiglu': 10.0}  # MLP ratio giving 30 D^2 MACs per token


def make_config(args, dispatch=None, dense_kind='swiglu', grouped='windows'):
  """S-width DiT-MoE 8E2A with `dispatch`, or (dispatch None) the FLOP-matched dense DiT."""
  config = common.load_config_module('dit_moe').get_config('demo')
  config.model.update(width=384, num_heads=6, depth=args.depth, patch_size=4, dtype=args.dtype)
  config.update(batch_size=args.batch, total_steps=args.steps + args.warmup + 1)
  if dispatch is None:
    config.model.moe.num_experts = 0
    config.model.update(mlp_kind=dense_kind, mlp_ratio=DENSE[dense_kind])
  else:
    config.model.mlp_ratio = 4.0  # experts of hidden 4D, as the paper's
    config.model.moe.update(num_experts=8, top_k=2, num_shared=2, dispatch=dispatch,
                            grouped_matmul=grouped)
  return config


DROPLESS, BLOCKS = 'MoE 8E2A dropless (windows)', 'MoE 8E2A dropless (blocks)'
RAGGED = 'MoE 8E2A dropless (ragged_dot)'
CAPACITY, DENSE_ALL = 'MoE 8E2A capacity', 'MoE 8E2A dense-all-experts'
RUNS = (('dense DiT SwiGLU (FLOP-matched)', None, 'swiglu', None),
        ('dense DiT GELU (FLOP-matched)', None, 'gelu', None),
        (DROPLESS, 'dropless', None, 'windows'),
        (BLOCKS, 'dropless', None, 'blocks'),
        (RAGGED, 'dropless', None, 'ragged_dot'),
        (CAPACITY, 'capacity', None, None),
        (DENSE_ALL, 'dense', None, None))


def layer_ms(args, tokens=64, width=384):
  """Median ms of forward + backward of one layer on [batch, tokens, width]: the
  FLOP-matched dense SwiGLU MLP and the MoE layer with each dispatch."""
  dtype = jnp.dtype(args.dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, tokens, width), dtype)
  modules = {'dense SwiGLU MLP (FLOP-matched)': layers.Mlp(int(DENSE['swiglu'] * width),
                                                          'swiglu', dtype)}
  for label, dispatch, _, grouped in RUNS[2:]:
    modules[label] = moe.MoE(num_experts=8, top_k=2, num_shared=2, dispatch=dispatch,
                             grouped_matmul=grouped or 'windows', dtype=dtype)
  out = {}
  for label, module in modules.items():
    params = module.init(jax.random.PRNGKey(1), x)['params']

    def loss(p, x, module=module):
      y, _ = module.apply({'params': p}, x, mutable=['intermediates'])
      return jnp.sum(jnp.square(y.astype(jnp.float32)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    stats = common.time_calls(lambda: grad(params, x), max(args.steps, 10), args.warmup)
    out[label] = 1e3 * stats['median_s']
  return out


def main(argv=None):
  args = parse_args(argv)
  ceilings, machine = common.start()
  rows = []
  settled = settled_state(args)
  for label, dispatch, kind, grouped in RUNS:
    state = None if dispatch is None else jax.tree.map(jnp.copy, settled)
    rows.append(train_step.measure(make_config(args, dispatch, kind, grouped or 'windows'),
                                   label, args, ceilings, machine['peak_bf16_flops'], state))
    print(f"  {label}: {rows[-1]['step_ms_median']:.1f} ms/step", flush=True)
  ms = {run[0]: row['step_ms_median'] for run, row in zip(RUNS, rows)}
  swiglu, gelu = ms[RUNS[0][0]], ms[RUNS[1][0]]
  for row in rows:
    row['vs_dense'] = row['step_ms_median'] / swiglu
    row['vs_dense_gelu'] = row['step_ms_median'] / gelu
  sparse = min(ms[DROPLESS], ms[CAPACITY])
  dense_all = ms[DENSE_ALL]
  summary = {'moe_over_dense_swiglu_best_sparse': sparse / swiglu,
             'moe_over_dense_gelu_best_sparse': sparse / gelu,
             'dense_all_experts_over_best_sparse': dense_all / sparse,
             'dense_all_experts_over_dropless_windows': dense_all / ms[DROPLESS],
             'dense_all_experts_over_dropless_blocks': dense_all / ms[BLOCKS],
             'dense_all_experts_over_capacity': dense_all / ms[CAPACITY],
             'dropless_blocks_over_windows': ms[BLOCKS] / ms[DROPLESS],
             'dropless_ragged_dot_over_windows': ms[RAGGED] / ms[DROPLESS]}
  layer = layer_ms(args)
  dense_mlp = layer['dense SwiGLU MLP (FLOP-matched)']
  summary['layer_ms'] = layer
  summary['layer_capacity_over_dense_mlp'] = layer[CAPACITY] / dense_mlp
  summary['layer_dropless_over_dense_mlp'] = layer[DROPLESS] / dense_mlp
  summary['layer_dropless_blocks_over_dense_mlp'] = layer[BLOCKS] / dense_mlp
  summary['layer_dense_all_experts_over_capacity'] = layer[DENSE_ALL] / layer[CAPACITY]
  summary['layer_dense_all_experts_over_dropless'] = layer[DENSE_ALL] / layer[DROPLESS]
  args.summary = summary
  common.finish(args, rows, COLUMNS, machine)
  print('one layer, forward + backward (ms): ' + ', '.join(f'{k} {v:.1f}' for k, v in
                                                          layer.items()))
  print(f"best sparse MoE step / FLOP-matched dense step: "
        f"{summary['moe_over_dense_swiglu_best_sparse']:.2f} vs SwiGLU (target <= 1.3), "
        f"{summary['moe_over_dense_gelu_best_sparse']:.2f} vs GELU; dense-all-experts / best "
        f"sparse: {summary['dense_all_experts_over_best_sparse']:.2f} (target >= 2), over dropless "
        f"windows {summary['dense_all_experts_over_dropless_windows']:.2f}, over capacity "
        f"{summary['dense_all_experts_over_capacity']:.2f}; dropless blocks / windows "
        f"{summary['dropless_blocks_over_windows']:.2f}, ragged_dot / windows "
        f"{summary['dropless_ragged_dot_over_windows']:.2f}")
  print(f"one layer: capacity / dense MLP {summary['layer_capacity_over_dense_mlp']:.2f}, "
        f"dropless / dense MLP {summary['layer_dropless_over_dense_mlp']:.2f}; dense-all-experts "
        f"/ capacity {summary['layer_dense_all_experts_over_capacity']:.2f}, / dropless "
        f"{summary['layer_dense_all_experts_over_dropless']:.2f}")

if __name__ == '__main__':
  main()
