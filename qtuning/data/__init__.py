"""Data: reading rows, the formats they come in, tokenisation with prompt masking, the token cache, and the Lightning
DataModule."""

from qtuning.data.cache import TokenizedSplit
from qtuning.data.datamodule import SFTDataModule, collate
from qtuning.data.examples import DataReport, DataSource, Example, load_examples
from qtuning.data.formats import FORMATS, to_messages
from qtuning.data.readers import Row, iter_rows, resolve_path
from qtuning.data.tokenize import PLAIN_CHAT_TEMPLATE, Encoded, encode_conversation, use_chat_template

__all__ = [
    "FORMATS",
    "PLAIN_CHAT_TEMPLATE",
    "DataReport",
    "DataSource",
    "Encoded",
    "Example",
    "Row",
    "SFTDataModule",
    "TokenizedSplit",
    "collate",
    "encode_conversation",
    "iter_rows",
    "load_examples",
    "resolve_path",
    "to_messages",
    "use_chat_template",
]
