"""Answer extraction and scoring for the generative benchmarks, and the lm-eval ``process_results`` hooks.

Pure functions (no lm-eval import): the task YAMLs reach them through ``tasks/utils.py`` (``!function utils.<fn>``).
Each ``*_process_results(doc, results)`` gets one task document and ``results = [generated text]``.
"""

from __future__ import annotations

import collections
import re
import string
from decimal import Decimal, InvalidOperation
from typing import Any

# GSM8K -----------------------------------------------------------------------------------------------------------

# A number as models write it: optional sign and "$", digit groups with commas, optional decimals ("-$1,234.50").
# A "-" right after a word or ")" is subtraction ("16-3"), not a sign.
_NUMBER = r"(?:(?<![\w)])-)?\$?\d(?:[\d,]*\d)?(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# Where the answer is stated: the 4-shot exemplars end with "The answer is N", GSM8K solutions with "#### N".
_MARKED_RE = re.compile(rf"(?:the answer is|####)\s*:?\s*({_NUMBER})", re.IGNORECASE)


def canonical_number(text: str) -> str:
    """``text`` with commas, ``$``, spaces and a trailing ``.`` removed, and a plain number written canonically:
    ``"5.0"`` and ``"5.00"`` become ``"5"``, ``"-0.50"`` becomes ``"-0.5"`` (so "$18.00" matches the gold "18").
    Text that is not a plain decimal number comes back only stripped."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return cleaned
    if not value.is_finite():
        return cleaned
    return "0" if value.is_zero() else format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final numeric answer in ``text``, canonical (see `canonical_number`), or None when there is no number.

    The first number stated as "The answer is N" or "#### N" wins; otherwise the last number in the text (the
    model's conclusion, when it ran on without the phrase)."""
    marked = _MARKED_RE.search(text)
    if marked:
        return canonical_number(marked.group(1))
    numbers = _NUMBER_RE.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def gsm8k_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``exact_match``: the final number of the generation equals the gold one (``doc["answer"]``: a GSM8K solution
    ending in "#### N", or the bare number)."""
    gold = extract_final_number(str(doc["answer"]))
    pred = extract_final_number(results[0])
    return {"exact_match": int(pred is not None and pred == gold)}


# SQuAD 2.0 and TriviaQA ------------------------------------------------------------------------------------------

# Predictions meaning "the passage does not answer this" (the prompt offers "impossible to answer"); matched as whole
# words anywhere in the normalised first line, so "It is impossible to answer." counts too.
NO_ANSWER_PHRASES: tuple[str, ...] = (
    "unanswerable",
    "impossible to answer",
    "cannot be answered",
    "can not be answered",
    "not answerable",
    "no answer",
)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_ANSWER_IS_RE = re.compile(r"^\s*(?:the\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def _first_answer_line(text: str) -> str:
    """The first non-empty line, without a leading "The answer is" (the paper's TriviaQA prompt asks for it)."""
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    return _ANSWER_IS_RE.sub("", line)


def is_no_answer(prediction: str) -> bool:
    """Whether ``prediction`` says the question cannot be answered (one of `NO_ANSWER_PHRASES`, as whole words)."""
    padded = f" {normalize_answer(prediction)} "
    return any(f" {phrase} " in padded for phrase in NO_ANSWER_PHRASES)


def _squad_prediction(prediction: str) -> str:
    """A prediction as scored: "no answer" phrases become the empty answer."""
    return "" if is_no_answer(prediction) else prediction


def _squad_golds(golds: list[str]) -> list[str]:
    """Gold answers, ``[""]`` when there are none (an unanswerable question)."""
    return [gold for gold in golds if normalize_answer(gold)] or [""]


def squad_exact(prediction: str, golds: list[str]) -> int:
    """1 when the normalised prediction equals a normalised gold answer. Unanswerable questions have gold ``[""]``:
    only a "no answer" prediction (`NO_ANSWER_PHRASES`, or an empty one) matches it."""
    pred = normalize_answer(_squad_prediction(prediction))
    return int(any(pred == normalize_answer(gold) for gold in _squad_golds(golds)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:  # the official rule: a no-answer scores 1 only against a no-answer
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: list[str]) -> float:
    """The best token-overlap F1 against the gold answers (normalised tokens, "no answer" handled as in
    `squad_exact`)."""
    pred_tokens = normalize_answer(_squad_prediction(prediction)).split()
    return max(_token_f1(pred_tokens, normalize_answer(gold).split()) for gold in _squad_golds(golds))


def _answer_texts(answers: Any) -> list[str]:
    """Gold answers as a list of strings; also takes the Hugging Face SQuAD form ``{"text": [...], ...}``."""
    if isinstance(answers, dict):
        answers = answers.get("text", [])
    return [str(answer) for answer in answers or []]


def squad2_target(doc: dict[str, Any]) -> str:
    """The reference answer shown in lm-eval's logged samples: the first gold answer, or "impossible to answer"."""
    golds = _answer_texts(doc["answers"])
    return golds[0] if golds and golds[0].strip() else "impossible to answer"


def squad2_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``exact`` and ``f1`` of the generation's first line against ``doc["answers"]`` (empty: unanswerable)."""
    prediction = _first_answer_line(results[0])
    golds = _answer_texts(doc["answers"])
    return {"exact": squad_exact(prediction, golds), "f1": squad_f1(prediction, golds)}


def triviaqa_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``exact_match``: the normalised generation equals one of the normalised aliases in ``doc["answers"]``;
    ``contains``: one of them appears in it as whole words (a small model answers in sentences)."""
    prediction = normalize_answer(_first_answer_line(results[0]))
    aliases = {normalize_answer(alias) for alias in _answer_texts(doc["answers"])} - {""}
    contains = any(f" {alias} " in f" {prediction} " for alias in aliases)
    return {"exact_match": int(bool(prediction) and prediction in aliases), "contains": int(contains)}


# MATH ------------------------------------------------------------------------------------------------------------

_FINAL_ANSWER_RE = re.compile(r"final answer is\s*\$(.+?)\$", re.IGNORECASE | re.DOTALL)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Formatting that does not change the answer (a simplified version of the Minerva normalisation).
_LATEX_NOISE = (
    "{,}",
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\displaystyle",
    "^\\circ",
    "^{\\circ}",
    "\\%",
    "%",
    "\\$",
    "$",
)
# Text right after a number is a unit ("5\text{ cm}^2", "12 \mbox{inches}"); elsewhere its content is the answer.
_UNIT_RE = re.compile(r"(?<=\d)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{(.*?)\}")
# Brace-less shorthand written out: \frac12 -> \frac{1}{2}, \frac1{2x} -> \frac{1}{2x}, \sqrt2 -> \sqrt{2}.
_FRAC_SHORT_RE = re.compile(r"\\frac([^{\\])(\{[^{}]*\}|[^{\\])")
_SQRT_SHORT_RE = re.compile(r"\\sqrt([^{\\])")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept; None if none."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def normalize_math_answer(answer: str) -> str:
    """A final MATH answer in a comparable form: no ``$``, ``\\left``/``\\right``, spacing commands, degree or percent
    signs, units after a number, ``\\text{}`` wrappers or spaces; ``dfrac``/``tfrac`` as ``frac`` and ``\\frac12``
    as ``\\frac{1}{2}``; the right side of an ``x = ...``; plain numbers canonical ("0.50" -> "0.5")."""
    answer = answer.strip()
    if "=" in answer:
        answer = answer.split("=")[-1]
    for noise in _LATEX_NOISE:
        answer = answer.replace(noise, "")
    answer = _TEXT_WRAPPER_RE.sub(r"\1", _UNIT_RE.sub("", answer))
    answer = "".join(answer.split()).rstrip(".")
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", answer)
    answer = _FRAC_SHORT_RE.sub(lambda m: f"\\frac{{{m[1]}}}{{{m[2].strip('{}')}}}", answer)
    return canonical_number(answer) if re.fullmatch(r"-?[\d,]*\.?\d+", answer) else answer


def extract_math_answer(text: str) -> str | None:
    """The final answer of a MATH solution: "The final answer is $X$" (the 4-shot format), else the last
    ``\\boxed{X}``, else the last number; normalised (see `normalize_math_answer`). None when there is none."""
    stated = _FINAL_ANSWER_RE.search(text)
    if stated:
        return normalize_math_answer(stated.group(1))
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_math_answer(boxed)
    numbers = _NUMBER_RE.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def math_gold(doc: dict[str, Any]) -> str | None:
    """The gold answer of a MATH document: ``doc["answer"]`` when given, else the last box of ``doc["solution"]``."""
    answer = doc.get("answer")
    if answer is not None and str(answer).strip():
        return normalize_math_answer(str(answer))
    boxed = last_boxed(str(doc.get("solution") or ""))
    return normalize_math_answer(boxed) if boxed is not None else None


def math_target(doc: dict[str, Any]) -> str:
    """The reference shown in lm-eval's logged samples and after each shot: the worked solution, else the answer."""
    return str(doc.get("solution") or doc.get("answer") or "")


def math_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """``exact_match``: the normalised final answer of the generation equals the gold one (string equality)."""
    gold, pred = math_gold(doc), extract_math_answer(results[0])
    return {"exact_match": int(gold is not None and pred == gold)}
