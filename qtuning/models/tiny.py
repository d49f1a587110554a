"""A character-level tokenizer and random-init Llamas, both built in code: the offline models for tests, demos and
benchmarks at real shapes."""

from __future__ import annotations

import string
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qtuning.data.tokenize import PLAIN_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
TINY_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character plus ``<pad> <unk> <s> </s>``; chat template: the plain one."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def build_random_llama(vocab_size: int, seed: int = 0, **architecture: Any) -> LlamaForCausalLM:
    """A random-init Llama (seeded): ``architecture`` holds `LlamaConfig` fields (hidden_size, num_hidden_layers, ...,
    tie_word_embeddings); the defaults are a 2-layer model small enough for a CPU step in milliseconds."""
    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_ARCHITECTURE, **architecture})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
