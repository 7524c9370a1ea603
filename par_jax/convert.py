r"""Convert released PyTorch weights (PAR, LlamaGen, the VQ-16 tokenizer) into par_jax checkpoints.

  python -m par_jax.convert --kind=gpt --input=PAR-XL-4x.pt --config=configs/par.py:size=XL,n=4,res=384 \
      --output=checkpoints/par_xl_4x
  python -m par_jax.convert --kind=vq --input=vq_ds16_c2i.pt --output=checkpoints/vq16

The GPT output is a params-only checkpoint (`par_jax.model.checkpoint.save_params`) that sampling, evaluation and
further training restore directly (e.g. --config.sample.checkpoint=checkpoints/par_xl_4x); the tokenizer output is
what `par_jax.tokenizer.load` reads. The weights must fit the config: every misfit is listed in one error. `.pt`
files need the optional PyTorch extra (`pip install -e ".[torch]"`); `.safetensors` files do not. Conversion runs on
the host CPU and needs about twice the checkpoint's size in memory.
"""

from __future__ import annotations

import os
import time

from absl import flags, logging

from par_jax.core import config_args


def define_flags(fv: flags.FlagValues, argv) -> None:
    flags.DEFINE_enum("kind", None, ["gpt", "vq"], "What the input holds: the GPT decoder or the VQ tokenizer.",
                      flag_values=fv)
    flags.DEFINE_string("input", None, "A .pt/.pth/.bin, .safetensors or .npz file of the PyTorch release.",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "New directory for the converted checkpoint (must not exist).",
                        flag_values=fv)
    config_args.define_config(fv, argv, "Experiment config whose `model` block (gpt) or `tokenizer` block (vq) the "
                              "weights must fit, e.g. configs/par.py:size=XL,n=4,res=384. Optional for vq (default: "
                              "VQ-16).")
    flags.DEFINE_string("key", None, "Entry of the checkpoint that holds the weights (e.g. ema); default: the file "
                        "itself if it holds tensors, else `model`, `module` or `state_dict`.", flag_values=fv)
    flags.DEFINE_bool("trust_pickle", False, "Allow arbitrary pickled objects in .pt files (only for files you "
                      "trust: unpickling can run code).", flag_values=fv)
    flags.DEFINE_bool("allow_bad_values", False, "Convert weights that hold NaN, inf or absurdly large values "
                      "(refused by default: they mark a damaged file).", flag_values=fv)
    flags.mark_flags_as_required(["kind", "input", "output"], flag_values=fv)


def _gib(state_dict) -> float:
    return sum(v.nbytes for v in state_dict.values()) / 2 ** 30


def _check_output(output) -> None:
    if os.path.exists(output):
        raise FileExistsError(f"--output {output} already exists; choose a new directory.")


def convert_gpt(input_path: str, model_cfg, output: str, *, key=None, trust_pickle: bool = False,
                check_values: bool = True):
    """Read a PyTorch GPT checkpoint, convert it for `model_cfg` and write a params-only checkpoint to `output`."""
    from par_jax.conversion import gpt  # noqa: PLC0415 (jax-heavy imports after flag parsing)
    from par_jax.core import state_dict as io  # noqa: PLC0415
    from par_jax.model import checkpoint  # noqa: PLC0415

    _check_output(output)
    start = time.time()
    sd = io.load_state_dict(input_path, key=key, trust_pickle=trust_pickle)
    logging.info("read %d tensors (%.2f GiB) from %s in %.1fs", len(sd), _gib(sd), input_path, time.time() - start)
    model = gpt.gpt_from_state_dict(sd, model_cfg, check_values=check_values)
    del sd
    logging.info("converted in %.1fs; writing %s", time.time() - start, output)
    checkpoint.save_params(output, model)
    logging.info("done in %.1fs: %s (restore with par_jax.model.checkpoint.load_params)", time.time() - start,
                 output)
    return model


def convert_vq(input_path: str, vq_cfg, output: str, *, key=None, trust_pickle: bool = False,
               check_values: bool = True):
    """Read a PyTorch VQ tokenizer checkpoint, convert it for `vq_cfg` and save it for `par_jax.tokenizer.load`."""
    from par_jax.conversion import vq  # noqa: PLC0415
    from par_jax.core import state_dict as io  # noqa: PLC0415
    from par_jax.core import checkpoint  # noqa: PLC0415

    _check_output(output)
    start = time.time()
    sd = io.load_state_dict(input_path, key=key, trust_pickle=trust_pickle)
    logging.info("read %d tensors (%.2f GiB) from %s in %.1fs", len(sd), _gib(sd), input_path, time.time() - start)
    model = vq.vq_from_state_dict(sd, vq_cfg, check_values=check_values)
    del sd
    checkpoint.save_params(output, model)  # the tokenizer's export layout: params + its config as JSON
    logging.info("done in %.1fs: %s (load with par_jax.tokenizer.load)", time.time() - start, output)
    return model


def tokenizer_config(config):
    """The VQConfig of an experiment config's `tokenizer` block; VQ-16 when there is none."""
    from par_jax import tokenizer  # noqa: PLC0415

    if config is not None and "tokenizer" in config:
        return tokenizer.from_config_dict(config.tokenizer)
    return tokenizer.vq_config("vq16")


def main(argv=None) -> None:
    f = config_args.parse_flags(argv, define_flags, doc=__doc__)
    config = f.config
    if f.kind == "gpt" and (config is None or "model" not in config):
        raise config_args.UsageError("--kind=gpt needs --config with a model block, e.g. "
                                     "--config=configs/par.py:size=XL,n=4,res=384.")
    import jax  # noqa: PLC0415 (after the command line is checked)

    from par_jax.conversion import ConversionError  # noqa: PLC0415

    try:
        # Host work: keep the arrays off accelerators (a 3B model would not fit on one).
        with jax.default_device(jax.devices("cpu")[0]):
            if f.kind == "gpt":
                from par_jax.model import from_config_dict  # noqa: PLC0415
                convert_gpt(f.input, from_config_dict(config.model), f.output, key=f.key,
                            trust_pickle=f.trust_pickle, check_values=not f.allow_bad_values)
            else:
                convert_vq(f.input, tokenizer_config(config), f.output, key=f.key,
                           trust_pickle=f.trust_pickle, check_values=not f.allow_bad_values)
    except (ConversionError, FileNotFoundError, FileExistsError, ImportError, ValueError, KeyError) as e:
        # A bad file or a misfit is the user's to fix: a short message and exit status 2, not a traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, ConversionError):
            message = f"{f.input}: {message}"
        raise config_args.UsageError(message) from None


if __name__ == "__main__":
    config_args.run(main)
