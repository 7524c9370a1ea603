"""Loading the PyTorch PAR / LlamaGen release: GPT and VQ-16 state dicts <-> par_jax models, `.pt`/`.safetensors` IO.

    from par_jax import conversion
    sd = conversion.load_state_dict("PAR-XL-4x.pt")                   # names -> NumPy arrays
    model = conversion.gpt_from_state_dict(sd, model_config("XL", n=4, grid_shape=(24, 24)))
    sd2 = conversion.gpt_to_state_dict(model)                          # and back
"""
from par_jax.conversion.checks import ConversionError
from par_jax.conversion.gpt import (check_gpt_state_dict, gpt_from_state_dict, gpt_to_state_dict,
                                    inspect_gpt_state_dict)
from par_jax.conversion.io import load_state_dict, save_state_dict

__all__ = ["ConversionError", "check_gpt_state_dict", "gpt_from_state_dict", "gpt_to_state_dict",
           "inspect_gpt_state_dict", "load_state_dict", "save_state_dict"]
