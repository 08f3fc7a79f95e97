"""Flax NNX ports of Qwen3 and Llama (incl. SmolLM2) with HF safetensors / GGUF I/O."""

from models.checkpoint import from_pretrained, init_model, save_pretrained, shard_model
from models.config import PRESETS, ModelConfig, RopeScaling, preset
from models.transformer import Transformer, forward

__all__ = [
    "ModelConfig", "RopeScaling", "PRESETS", "preset", "Transformer", "forward",
    "from_pretrained", "save_pretrained", "init_model", "shard_model",
]
