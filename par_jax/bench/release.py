"""The PyTorch release of PAR, run from a checkout of it, on the same weights as par_jax (bench.sample --release).

The release (github.com/YuqingWang1029/PAR: LlamaGen plus PAR's patch) is an input, never copied: its
`autoregressive/models/gpt.py` (the GPT) and `generate.py` (its sampling loop) are imported from the checkout given.
Its GPT is built with the run's model shape and random weights (its own initialisers, plus a random vocabulary head,
which it initialises to zero), and par_jax's model is converted from that state dict (par_jax.conversion), so both
hold identical weights; `max_logits_difference` checks that on the training forward before anything is timed.

Sampling runs the release's own `generate` (class prefill, n - 1 one-token steps, then steps of n tokens, guidance
by batch doubling, `torch.multinomial` draws) in float32 without torch.compile (the release compiles only when asked,
with mode="reduce-overhead", i.e. CUDA graphs). For n = 1 its `generate` fails (it concatenates an empty list of
parallel steps), so n = 1 runs LlamaGen's loop from the same file: its `prefill`, then `decode_n_tokens` for every
other token.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np

from par_jax.conversion import gpt_from_state_dict
from par_jax.core import config_args

_FILES = ("autoregressive/models/gpt.py", "autoregressive/models/generate.py")
_TRANSITION_KEY = "spe_tok_embeddings.special_embeddings.weight"


def check_checkout(directory: str) -> str:
    """The checkout's absolute path, or a UsageError saying what is missing and where to get it."""
    missing = [f for f in _FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise config_args.UsageError(
            f"--release={directory} is not a checkout of the PyTorch PAR release (it has no {', '.join(missing)}): "
            f"clone https://github.com/YuqingWang1029/PAR and pass its top folder.")
    return os.path.abspath(directory)


def check_config(cfg) -> None:
    """A UsageError for a model the release cannot build (its GPT knows square 2-D grids and PAR's region order)."""
    if len(cfg.grid_shape) != 2 or cfg.grid_shape[0] != cfg.grid_shape[1]:
        raise config_args.UsageError(f"--release needs a square 2-D token grid (the release's GPT asserts one); got "
                                     f"--grid={'x'.join(map(str, cfg.grid_shape))}: use e.g. --grid=24x24.")
    if cfg.order_kind != "region" or not cfg.sequential_prefix or cfg.intra_group != "full":
        raise config_args.UsageError("--release times PAR's own layout (region order, sequential prefix, full "
                                     "intra-group attention); the ablation layouts exist only in par_jax.")


def _import(directory: str) -> tuple[types.ModuleType, types.ModuleType]:
    root = check_checkout(directory)
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise config_args.UsageError('--release needs PyTorch: pip install -e ".[torch]" (torch==2.13.0).') from None
    if root not in sys.path:
        sys.path.insert(0, root)  # the release imports its own top-level packages (autoregressive, utils)
    mods = tuple(importlib.import_module(name) for name in ("autoregressive.models.gpt",
                                                             "autoregressive.models.generate"))
    for mod, file in zip(mods, _FILES):
        if os.path.abspath(mod.__file__) != os.path.join(root, file):
            raise config_args.UsageError(f"{mod.__name__} was imported from {mod.__file__}, not from --release={root}:"
                                         f" another package of that name shadows it (one release per process).")
    return mods


class Release:
    """The release's GPT with random weights for `cfg`'s shape, and its sampling loop. `.state_dict` holds the
    weights (PyTorch names, NumPy arrays) for par_jax's converter."""

    def __init__(self, directory: str, cfg, seed: int = 0):
        check_config(cfg)
        gpt, self._generate = _import(directory)
        import torch  # noqa: PLC0415
        self._torch = torch
        torch.manual_seed(seed)
        args = gpt.ModelArgs(dim=cfg.dim, n_layer=cfg.num_layers, n_head=cfg.num_heads, vocab_size=cfg.vocab_size,
                             num_classes=cfg.num_classes, block_size=cfg.num_tokens, cls_token_num=1,
                             spe_token_num=cfg.n - 1, ar_token_num=cfg.n, token_dropout_p=0.0, resid_dropout_p=0.0,
                             ffn_dropout_p=0.0, rope_base=cfg.rope_base, norm_eps=cfg.norm_eps,
                             multiple_of=cfg.multiple_of)
        self.model = gpt.Transformer(args).to(torch.float32).eval()
        with torch.no_grad():  # its initialiser zeroes the head: every token would be equally likely
            self.model.output.weight.normal_(0.0, args.initializer_range)
        self.cfg = cfg

    @property
    def state_dict(self) -> dict[str, np.ndarray]:
        sd = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
        if self.cfg.n == 1:
            sd.pop(_TRANSITION_KEY, None)  # an empty (0, dim) table: LlamaGen has none
        return sd

    def par_jax_model(self):
        """par_jax's ParTransformer holding the same weights (through par_jax.conversion)."""
        return gpt_from_state_dict(self.state_dict, self.cfg)

    def logits(self, tokens, labels) -> np.ndarray:
        """The release's training forward on raster-order tokens (B, N): float32 logits (B, N, V) in raster order."""
        torch, cfg = self._torch, self.cfg
        gen_order = np.take(np.asarray(tokens), cfg.layout.perm, axis=1)
        embed = self.model.cls_embedding
        dropout_prob, embed.dropout_prob = embed.dropout_prob, 0.0  # its training path would drop labels
        self.model.train()  # the only path that takes a whole sequence (every dropout above is 0)
        try:
            with torch.no_grad():
                logits, _ = self.model(torch.as_tensor(gen_order[:, :-1], dtype=torch.long),
                                       cond_idx=torch.as_tensor(np.asarray(labels), dtype=torch.long))
        finally:
            self.model.eval()
            embed.dropout_prob = dropout_prob
        return np.take(logits.numpy(), cfg.layout.inverse, axis=1)

    def sample(self, labels, guidance: float, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> np.ndarray:
        """Tokens (B, N) in the release's generation order, drawn by its own loop."""
        torch, g, n, num = self._torch, self._generate, self.cfg.n, self.cfg.num_tokens
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, sample_logits=True)
        cond = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        with torch.no_grad():
            if n > 1:
                return g.generate(self.model, cond, num, cfg_scale=guidance, cfg_interval=-1, ar_token_num=n,
                                  spe_token_num=n - 1, **kw).numpy()
            # LlamaGen's loop (the release's generate needs n > 1).
            rows = torch.cat([cond, torch.full_like(cond, self.model.num_classes)]) if guidance > 1.0 else cond
            self.model.setup_caches(max_batch_size=len(rows), max_seq_length=num + 1, dtype=torch.float32)
            first = g.prefill(self.model, rows, torch.arange(0, 1), guidance, **kw)
            rest, _ = g.decode_n_tokens(self.model, first, torch.tensor([1], dtype=torch.int), num - 1, guidance, -1,
                                        **kw)
            return torch.cat([first, *rest], dim=1).numpy()


def max_logits_difference(release: Release, model, batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """(largest |difference|, largest |logit|) between the release's and par_jax's training-forward logits on the
    same random tokens and labels: the weights and the math agree when the first is float32 rounding."""
    import jax.numpy as jnp  # noqa: PLC0415

    cfg = release.cfg
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, cfg.num_tokens)).astype(np.int32)
    labels = rng.integers(0, cfg.num_classes, (batch,)).astype(np.int32)
    want = release.logits(tokens, labels)
    _, got = model(jnp.asarray(tokens), jnp.asarray(labels))
    got = np.asarray(got, np.float32)
    return float(np.abs(got - want).max()), float(np.abs(want).max())
