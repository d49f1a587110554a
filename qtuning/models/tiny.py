"""A character-level tokenizer and a random-init Llama, both built in code: the offline model for tests and demos."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qtuning.data.tokenize import PLAIN_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


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


def build_tiny_llama(
    vocab_size: int,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random-init Llama (seeded), small enough for a CPU step in milliseconds."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
