"""Loading the PyTorch PAR / LlamaGen release: GPT and VQ-16 state dicts <-> par_jax models.

The file readers and writers (`.pt`, `.safetensors`, `.npz`) are generic and live in `par_jax.core.state_dict`;
they are re-exported here.

    from par_jax import conversion
    sd = conversion.load_state_dict("PAR-XL-4x.pt")                   # names -> NumPy arrays
    model = conversion.gpt_from_state_dict(sd, model_config("XL", n=4, grid_shape=(24, 24)))
    sd2 = conversion.gpt_to_state_dict(model)                          # and back
    vq = conversion.vq_from_state_dict(conversion.load_state_dict("vq_ds16_c2i.pt"), vq_config("vq16"))
"""
from par_jax.conversion.checks import ConversionError
from par_jax.conversion.gpt import (check_gpt_state_dict, gpt_from_state_dict, gpt_to_state_dict,
                                    inspect_gpt_state_dict)
from par_jax.core.state_dict import StateDictFileError, load_state_dict, save_state_dict

_VQ_NAMES = ("check_vq_state_dict", "inspect_vq_state_dict", "vq_from_state_dict", "vq_to_state_dict")


def __getattr__(name):
    # The tokenizer converters import the tokenizer; GPT conversion does not need it.
    if name in _VQ_NAMES:
        from par_jax.conversion import vq  # noqa: PLC0415
        return getattr(vq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConversionError", "StateDictFileError", "check_gpt_state_dict", "gpt_from_state_dict", "gpt_to_state_dict",
           "inspect_gpt_state_dict", "load_state_dict", "save_state_dict", *_VQ_NAMES]
