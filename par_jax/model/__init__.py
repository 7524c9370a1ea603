"""The PAR decoder (LlamaGen GPT + PAR order, transition embeddings, block-causal attention)."""
from par_jax.model.config import SIZES, ModelConfig, from_config_dict, model_config
from par_jax.model.transformer import ParTransformer, check_inputs, count_params

__all__ = ["SIZES", "ModelConfig", "from_config_dict", "model_config", "ParTransformer",
           "check_inputs", "count_params"]
