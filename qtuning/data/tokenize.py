"""Chat messages → ``input_ids`` and ``labels`` (−100 on everything that is not an assistant response).

The conversation is rendered with the tokenizer's chat template one message at a time. Each rendering must extend
the previous one; the text each message adds is tokenised on its own, so the prompt/response boundary is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from qtuning import IGNORE_INDEX
from qtuning.data.formats import Message
from qtuning.errors import QTuningError

# For base models without a chat template: Alpaca-style headers, EOS after each response. Literal newlines sit in
# expressions because transformers renders templates with trim_blocks (a newline after a tag is dropped).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ ('' if loop.first or loop.previtem['role'] == 'system' else '\\n\\n') + '### Instruction:\\n' "
    "+ message['content'] + '\\n\\n### Response:\\n' }}"
    "{%- else -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def use_chat_template(tokenizer: PreTrainedTokenizerBase, choice: str) -> None:
    """``auto``: the tokenizer's own template, or the plain one if it has none; ``plain``: always the plain one."""
    if choice not in ("auto", "plain"):
        raise QTuningError(f"model.chat_template={choice!r} must be 'auto' or 'plain'")
    if choice == "plain" or not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE


def markup_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids only a template writes, never plain text: the special tokens and the added tokens flagged special (turn
    ends such as ``<|im_end|>``, EOS), not the unknown token, which text does produce."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return (set(tokenizer.all_special_ids) | added) - {tokenizer.unk_token_id}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int, location: str = ""
) -> Encoded:
    """Token ids and labels of one conversation, truncated to ``max_length`` (the start is kept).

    Assistant turns that answer a user turn are trained on exactly as the template writes them (its turn end, e.g.
    ChatML's ``<|im_end|>\n``, included); EOS is appended only to a turn in which the template wrote no special token
    at all, so that the model still learns to stop. Blank assistant turns are masked like prompt text, so a
    conversation whose responses are all blank has no labels.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    markup = markup_ids(tokenizer)

    def add(text: str, train: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise QTuningError(
                f"{location}: the chat template re-renders earlier messages differently once later ones are added; "
                "use model.chat_template=plain"
            )
        ids = tokenizer(text[len(rendered) :], add_special_tokens=False)["input_ids"]
        if train and tokenizer.eos_token_id is not None and markup.isdisjoint(ids):  # no terminator written
            ids = ids + [tokenizer.eos_token_id]
        input_ids.extend(ids)
        labels.extend(ids if train else [IGNORE_INDEX] * len(ids))
        rendered = text

    for k, message in enumerate(messages):
        if len(input_ids) >= max_length:
            return Encoded(input_ids[:max_length], labels[:max_length], truncated=True)
        prompted = any(m["role"] == "user" for m in messages[:k])
        if message["role"] == "assistant" and prompted:
            add(_render(tokenizer, messages[:k], generation_prompt=True), train=False)
            add(_render(tokenizer, messages[: k + 1], generation_prompt=False), train=bool(message["content"].strip()))
        else:  # prompt text, and assistant text that answers no user turn (split conversations): context only
            add(_render(tokenizer, messages[: k + 1], generation_prompt=False), train=False)
    return Encoded(input_ids[:max_length], labels[:max_length], truncated=len(input_ids) > max_length)
