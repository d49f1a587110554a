"""Bad input through the CLI: one line ``error: <message>`` naming the file:line or config key, status 2, no traceback
(out-of-range numbers of every key family among them); ``data.on_bad_row=skip`` training on the good rows; and what
`check_checkpoint` says of damaged checkpoints.

Each CLI case runs as ``python -m qtuning.train`` would, forked from one start-up (`tests.cli_cases`); they fail
before any model is trained. One case also runs as its own ``python -m qtuning.train``.
"""

from __future__ import annotations

import json
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from qtuning.errors import QTuningError
from qtuning.resume import check_checkpoint
from tests.conftest import TINY_DATA, made_once, run_cli, run_cli_cases, tiny_cli_args

GOOD_ROW = '{"prompt": "What is 1 + 1?", "completion": "2"}'

# (bad file name, content) or None, overrides, the start of the error line; "{path}" stands for the bad file.
CASES = [
    pytest.param(
        ("cut.json", f'[\n{GOOD_ROW},\n{{"prompt": "What is 2 + 2?", "compl'),
        ["data.path={path}"],
        "error: {path}:3: malformed JSON",
        id="truncated-json",
    ),
    pytest.param(
        ("utf.jsonl", GOOD_ROW.encode() + b'\n{"prompt": "\xff", "completion": "2"}\n'),
        ["data.path={path}"],
        "error: {path}:2: not valid UTF-8",
        id="invalid-utf8",
    ),
    pytest.param(
        ("miss.jsonl", f'{GOOD_ROW}\n{{"prompt": "What is 3 + 3?"}}\n'),
        ["data.path={path}"],
        "error: {path}:2: missing field 'completion'",
        id="missing-field",
    ),
    pytest.param(
        ("type.jsonl", '{"prompt": "What is 3 + 3?", "completion": 6}\n'),
        ["data.path={path}"],
        "error: {path}:1: field 'completion' must be str, got int",
        id="wrong-type",
    ),
    pytest.param(("empty.jsonl", ""), ["data.path={path}"], "error: data.path={path}: no rows", id="empty-file"),
    pytest.param(
        ("blank.jsonl", '{"prompt": "a", "completion": ""}\n{"prompt": "b", "completion": "  "}\n'),
        ["data.path={path}"],
        "error: data.path={path}: no usable rows (2 read: 2 without response tokens (empty responses",
        id="empty-responses",
    ),
    pytest.param(None, ["data.format=yaml"], "error: data.format='yaml' is unknown", id="unknown-format"),
    pytest.param(
        None,
        ["data.path=/nonexistent/data.jsonl"],
        "error: data.path=/nonexistent/data.jsonl: no such file",
        id="missing-data",
    ),
    pytest.param(
        None,
        ["pruner=nonsense"],
        "error: In 'train': Could not find 'pruner/nonsense' Available options in 'pruner': combo none qtuning",
        id="unknown-pruner",
    ),
    pytest.param(None, ["trainer.max_stepz=3"], "error: Could not override 'trainer.max_stepz'", id="unknown-key"),
    pytest.param(
        None,
        ["experiment=mini_repro", "eval=null"],
        "error: Config group override must be a string or a list. Got NoneType",
        id="null-group-override",
    ),
    pytest.param(None, ["data.path=???"], "error: data.path: required, but no value given", id="missing-value"),
    pytest.param(
        None,
        ["pruner=random_batch", "pruner.r_sample=2"],
        "error: pruner.r_sample=2 must be in (0, 1]",
        id="pruner-ratio",
    ),
    pytest.param(None, ["budget.r_sample=0"], "error: budget.r_sample=0 must be in (0, 1]", id="ratio-0"),
    pytest.param(None, ["budget.r_token=1.5"], "error: budget.r_token=1.5 must be in (0, 1]", id="ratio-1.5"),
    pytest.param(
        None,
        ["model=hf", "model.name_or_path=/nope"],
        "error: model.name_or_path=/nope: no such directory",
        id="missing-model",
    ),
    pytest.param(
        ("last.ckpt", b"PK\x03\x04 cut short"),
        ["resume={path}"],
        "error: resume={path}: not a checkpoint",
        id="corrupt-checkpoint",
    ),
    pytest.param(
        None,
        ["trainer=fsdp2_cpu", "eval=arc"],
        "error: eval under trainer=fsdp2: rank 0 alone cannot run a sharded model",
        id="eval-under-fsdp2",
    ),
    pytest.param(
        None,
        ["data.on_bad_row=ignore"],
        "error: data.on_bad_row='ignore' must be one of error, skip",
        id="bad-on_bad_row",
    ),
]


def bad_file_path(case_dir: Path, bad_file) -> str:
    """Where a case's bad file is written ("" for a case without one)."""
    if bad_file is None:
        return ""
    name, content = bad_file
    (case_dir / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(case_dir / name)


@pytest.fixture(scope="session")
def cli_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, subprocess.CompletedProcess]]:
    """Every bad-input and out-of-range command line, run once in the session: case id -> (its bad file's path, the
    result)."""
    root = made_once(tmp_path_factory, "cli", run_every_case)
    saved = json.loads((root / "results.json").read_text())
    return {
        case_id: (path, subprocess.CompletedProcess(args, *result)) for case_id, (path, args, result) in saved.items()
    }


def run_every_case(root: Path) -> None:
    """Writes ``root/results.json``: case id -> (bad file path, args, (returncode, stdout, stderr))."""
    paths: dict[str, str] = {}
    cases: dict[str, tuple[str, list[str]]] = {}
    for case in CASES:
        (bad_file, overrides, _), case_dir = case.values, root / case.id
        case_dir.mkdir()
        paths[case.id] = bad_file_path(case_dir, bad_file)
        cases[case.id] = ("qtuning.train", tiny_cli_args(case_dir, *(o.format(path=paths[case.id]) for o in overrides)))
    for key, (overrides, _) in RANGE_CASES.items():
        case_dir = root / f"range-{key}"
        if overrides[0].startswith("eval."):
            args = ["model=tiny_llama", "logger=none", f"hydra.run.dir={case_dir}", *overrides]
            cases[f"range-{key}"] = ("qtuning.eval", args)
        else:
            keys = {o.split("=")[0] for o in overrides}
            base = [o for o in tiny_cli_args(case_dir) if o.split("=")[0] not in keys]  # callbacks=default replaces
            cases[f"range-{key}"] = ("qtuning.train", [*base, *overrides])
    results = run_cli_cases(list(cases.values()))
    saved = {
        case_id: (paths.get(case_id, ""), r.args, (r.returncode, r.stdout, r.stderr))
        for case_id, r in zip(cases, results, strict=True)
    }
    (root / "results.json").write_text(json.dumps(saved))


@pytest.mark.xdist_group("cli")  # on one worker, mostly: the other would wait for the cases (made_once)
@pytest.mark.parametrize(("bad_file", "overrides", "expected"), CASES)
def test_bad_input_is_one_clear_error_line(cli_results, request, bad_file, overrides, expected):
    path, result = cli_results[request.node.callspec.id]
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(expected.format(path=path)), errors


def error_lines(result) -> list[str]:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# One out-of-range number per key family (qtuning.ranges), each refused before any model loads: (overrides, the line).
RANGE_CASES = {
    "data": (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    "trainer": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    "optimizer": (["optimizer.lr=-1"], "optimizer.lr=-1 must be > 0"),
    "scheduler": (["scheduler.warmup_ratio=1.5"], "scheduler.warmup_ratio=1.5 must be in [0, 1)"),
    "pruner": (["pruner.lam=2"], "pruner.lam=2 must be in [0, 1]"),
    "pruner.sample": (
        ["pruner=combo", "pruner/sample=infobatch", "pruner.sample.delta=1.5"],
        "pruner.sample.delta=1.5 must be in [0, 1]",
    ),
    "pruner.token": (
        ["pruner=combo", "pruner.token.r_token=0"],
        "pruner.token.r_token=0 must be in (0, 1]",
    ),
    "eval": (["eval.batch_size=0"], "eval.batch_size=0 must be an integer >= 1"),  # through qtuning.eval
    "model.lora": (["model.lora.r=0"], "model.lora.r=0 must be an integer >= 1"),
    "callbacks": (
        ["callbacks=default", "callbacks.progress.every_n_steps=0"],
        "callbacks.progress.every_n_steps=0 must be an integer >= 1",
    ),
    "top-level": (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
}


@pytest.mark.xdist_group("cli")
@pytest.mark.parametrize(("overrides", "expected"), RANGE_CASES.values(), ids=RANGE_CASES.keys())
def test_a_number_out_of_range_is_one_error_line_naming_the_key(cli_results, request, overrides, expected):
    _, result = cli_results[f"range-{request.node.callspec.id}"]
    assert error_lines(result) == [f"error: {expected}"]


@pytest.mark.slow  # its own start-up: python -m qtuning.train itself, not a forked case
def test_the_module_entry_point_gives_the_same_one_line(tmp_path: Path):
    errors = error_lines(run_cli(*tiny_cli_args(tmp_path, "trainer.max_stepz=3")))
    assert len(errors) == 1 and errors[0].startswith("error: Could not override 'trainer.max_stepz'"), errors


@pytest.mark.slow
def test_skip_trains_on_the_good_rows_and_reports_the_bad_ones(tmp_path: Path):
    good = TINY_DATA.read_text().splitlines()
    long_row = '{"prompt": "Say x many times.", "completion": "' + "x" * 100 + '"}'  # past max_length=64
    rows = [good[0], '{"prompt": "cut', *good[1:20], '{"prompt": "no completion"}', long_row, *good[20:]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = run_cli(*tiny_cli_args(tmp_path, f"data.path={path}", "data.on_bad_row=skip"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if "data: " in line]
    assert len(summary) == 1, result.stdout
    assert f"data: {len(rows)} rows from {path}; 2 skipped as malformed (first: {path}:2: malformed JSON" in summary[0]
    assert "; 1 truncated to max_length;" in summary[0]
    assert f"; {len(good) + 1 - 8} train / 8 validation" in summary[0]
    assert (tmp_path / "run" / "metrics.json").exists()


RESUMABLE = {"state_dict": {"w": torch.zeros(2)}, "optimizer_states": [{}]}


@pytest.mark.parametrize(
    ("saved", "cut", "expected"),
    [
        (RESUMABLE, True, "not a checkpoint (not a torch.save zip archive"),
        (
            {**RESUMABLE, "extra": Fraction(1, 2)},
            False,
            "cannot load it as a checkpoint (UnpicklingError: Weights only",
        ),
        ({"w": torch.zeros(2)}, False, "not a Lightning checkpoint (no 'state_dict')"),
        ({"state_dict": {"w": torch.zeros(2)}}, False, "holds weights only"),
    ],
    ids=["truncated", "code-objects", "plain-state-dict", "weights-only"],
)
def test_check_checkpoint_says_what_is_wrong(tmp_path: Path, saved, cut, expected):
    path = tmp_path / "x.ckpt"
    torch.save(saved, path)
    if cut:
        check_checkpoint(str(path))  # whole, it is fine
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(QTuningError, match=re.escape(f"resume={path}: {expected}")):
        check_checkpoint(str(path))


def test_check_checkpoint_says_what_a_directory_lacks(tmp_path: Path):
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(
        QTuningError, match=re.escape("a directory, but not a sharded checkpoint (no meta.pt, .metadata)")
    ):
        check_checkpoint(str(tmp_path / "last.ckpt"))
