r"""VIM (stage 2): class-conditional autoregressive generation over a trained ViT-VQGAN's codes.

  python -m jaxgen.main --config=configs/vitvqgan.py:demo --workdir=workdirs/vitvqgan
  python -m jaxgen.main --config=configs/vim.py:demo --workdir=workdirs/vim \
      --config.tokenizer.workdir=workdirs/vitvqgan
  python -m jaxgen.main --config=configs/vim.py:VIM-L --mode=info
  python -m jaxgen.main --config=configs/vim.py:demo,flextok --workdir=workdirs/flextok_ar \
      --config.tokenizer.workdir=workdirs/flextok

Argument: <variant>[,flextok].

Variants: `tiny` (tests), `demo` (Fashion-MNIST over the vitvqgan demo tokenizer: 512 codes,
64 tokens per image) and the paper's `VIM-B` (24 blocks, width 1536) and `VIM-L` (36, 2048)
over an ImageNet-256 tokenizer (8192 codes, 32x32 = 1024 tokens), Adam (0.9, 0.96), 5k
warm-up to 4.5e-4 then cosine to 1e-5, batch 1024, 450k steps, dropout 0.1. Samples use
temperature / top-k / top-p and, with sample.cfg_scale != 1 (needs model.class_dropout > 0
in training), classifier-free guidance. `,flextok` models a FlexTok tokenizer's ordered
tokens instead (tiny: 75 codes x 8 tokens; demo: FSQ 8x5x5x5 = 1000 codes x 32 tokens);
`--config.sample.num_tokens=k` then generates only the first k tokens and decodes those.
"""
import ml_collections

from jaxgen import config_base
from jaxgen.errors import UserError

# name -> (depth, width, heads)
SIZES = {'VIM-B': (24, 1536, 16), 'VIM-L': (36, 2048, 16)}
VARIANTS = ('tiny', 'demo', *SIZES)


def get_config(arg='demo'):
  arg, _, tokenizer = arg.partition(',')
  if arg not in VARIANTS or tokenizer not in ('', 'flextok'):
    raise UserError(f'unknown vim variant {arg!r}: use one of {VARIANTS}, optionally with '
                    '",flextok" (e.g. configs/vim.py:demo or configs/vim.py:demo,flextok)')
  c = config_base.base_config()
  c.family = 'vim'
  c.tokenizer = ml_collections.ConfigDict(dict(family=tokenizer or 'vitvqgan', workdir='',
                                               codebook_size=8192, num_tokens=1024))
  c.model = ml_collections.ConfigDict(dict(width=1536, depth=24, num_heads=16, mlp_dim=6144,
                                           dropout=0.1, class_dropout=0.0, dtype='float32'))
  c.sample = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0,
                                            num_tokens=0, per_class=8, seed=0))
  c.optim.update(lr=4.5e-4, b1=0.9, b2=0.96, schedule='cosine', warmup_steps=5000,
                 end_lr_ratio=1e-5 / 4.5e-4, grad_clip=1.0, ema_decay=0.0)
  c.data.update(name='imagenet2012', image_size=256, channels=3, num_classes=1000)
  c.update(total_steps=450_000, batch_size=1024, log_every=100, checkpoint_every=5000,
           sample_every=20_000)
  if arg in SIZES:
    depth, width, heads = SIZES[arg]
    c.model.update(depth=depth, width=width, num_heads=heads, mlp_dim=4 * width)
    if tokenizer == 'flextok':  # over configs/flextok.py:d18-d28 (FSQ 64,000 codes x 256)
      c.tokenizer.update(codebook_size=64_000, num_tokens=256)
    return c
  c.data = config_base.base_config().data  # Fashion-MNIST 32x32x1
  c.model.class_dropout = 0.1
  c.eval.update(metrics='loss')
  if arg == 'tiny':  # over configs/vitvqgan.py:tiny (64 codes, 16 tokens)
    c.tokenizer.update(codebook_size=64, num_tokens=16)
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.sample.update(per_class=1, cfg_scale=2.0, top_k=16)
    c.update(total_steps=4, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False,
             eval_batches=1)
    c.optim.update(lr=1e-3, warmup_steps=0, schedule='constant')
  else:  # demo, over configs/vitvqgan.py:demo (512 codes, 64 tokens)
    c.tokenizer.update(codebook_size=512, num_tokens=64)
    c.model.update(width=128, depth=4, num_heads=4, mlp_dim=512)
    c.sample.update(cfg_scale=2.0, top_k=0, top_p=0.95)
    c.update(total_steps=2000, batch_size=64, log_every=50, checkpoint_every=500,
             sample_every=500)
    c.optim.update(lr=1e-3, warmup_steps=100, end_lr_ratio=0.05)
  if tokenizer == 'flextok':  # over configs/flextok.py:<tiny|demo>
    c.tokenizer.update(codebook_size=75 if arg == 'tiny' else 1000,
                       num_tokens=8 if arg == 'tiny' else 32)
  return c
