r"""PAR class-conditional decoder on pre-extracted VQ codes (ImageNet by default).

Arguments (comma-separated `key=value`, all optional):
  size=XL        model size: tiny, small, B, L, XL, XXL, 3B
  n=4            tokens per parallel step (1 = LlamaGen, 4, 16, any square dividing the grid)
  res=384        image resolution (tokens per side = res / 16)
  recipe=paper   training recipe: paper (warmup + cosine, attention dropout 0.1) or release (constant lr)
  runlocal       shrink the same experiment to run on one CPU in minutes (size tiny, 128 px, float32)

Launch (one host):
  python -m par_jax.main --config=configs/par.py:size=XL,n=4,res=384 --workdir=gs://BUCKET/par_xl_4x
Local smoke run:
  python -m par_jax.main --config=configs/par.py:runlocal --workdir=/tmp/par_local
Any field can be overridden, e.g. --config.optimizer.lr=2e-4 --config.train.batch_size=512.
"""

from configs import common


def get_config(arg: str = ""):
    return common.par_config(arg)
