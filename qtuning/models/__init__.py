"""Models: the tiny test Llama, SmolLM2-135M from its package, any local Hugging Face directory; LoRA via peft."""

from qtuning.models.build import apply_lora, build_model, build_tokenizer
from qtuning.models.smollm2 import convert_smollm2
from qtuning.models.tiny import build_char_tokenizer, build_random_llama

__all__ = [
    "apply_lora",
    "build_char_tokenizer",
    "build_model",
    "build_tokenizer",
    "build_random_llama",
    "convert_smollm2",
]
