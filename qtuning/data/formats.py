"""Every supported row format becomes one shape: a list of chat messages ``{"role", "content"}``.

Roles are ``system``, ``user`` and ``assistant``; assistant turns are the response (trained on), the rest is prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtuning.data.readers import Row
from qtuning.errors import QTuningError

Message = dict[str, str]

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant")


def _field(row: Row, obj: Any, key: str, kind: type, required: bool = True) -> Any:
    """``obj[key]`` checked for presence and type; the error names the row and the field."""
    if not isinstance(obj, dict):
        raise QTuningError(f"{row.location}: expected an object with field '{key}', got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if required:
            raise QTuningError(f"{row.location}: missing field '{key}'")
        return kind()
    value = obj[key]
    if not isinstance(value, kind):
        raise QTuningError(f"{row.location}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _alpaca(row: Row) -> list[Message]:
    instruction = _field(row, row.data, "instruction", str)
    extra = _field(row, row.data, "input", str, required=False)
    output = _field(row, row.data, "output", str)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _prompt_completion(row: Row) -> list[Message]:
    prompt = _field(row, row.data, "prompt", str)
    completion = _field(row, row.data, "completion", str)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _turns(row: Row, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    messages = []
    for i, turn in enumerate(_field(row, row.data, key, list)):
        where = Row(f"{row.location} ({key}[{i}])", turn)
        role = _field(where, turn, role_key, str)
        if role not in roles:
            raise QTuningError(f"{where.location}: unknown role '{role}' (expected one of {', '.join(roles)})")
        messages.append({"role": roles[role], "content": _field(where, turn, text_key, str)})
    return messages


def _messages(row: Row) -> list[Message]:
    return _turns(row, "messages", "role", "content", {r: r for r in CHAT_ROLES})


def _sharegpt(row: Row) -> list[Message]:
    return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)


FORMATS: dict[str, Callable[[Row], list[Message]]] = {
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "messages": _messages,
    "sharegpt": _sharegpt,
}


def to_messages(row: Row, fmt: str) -> list[Message]:
    """The chat messages of one row in format ``fmt`` (a key of `FORMATS`)."""
    if fmt not in FORMATS:
        raise QTuningError(f"data.format={fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt](row)
