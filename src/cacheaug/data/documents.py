"""The one document format shared by training text and GSM8K prompts, and the readers of small JSONL files
(evaluation sets). Nothing here imports torch: the CLI checks files with it before loading a model."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from ..errors import DataError

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def render_document(question: str, worked_answer: str, final: int | str) -> str:
    """The one document format shared by the embedded corpus and GSM8K rows."""
    return f"Question: {question.strip()}\nAnswer: {worked_answer.strip()}\n#### {final}"


def gsm8k_document(question: str, answer: str) -> str:
    """Render a GSM8K row: calculator annotations ``<<expr=result>>`` stripped, final answer after ``####``."""
    text = _CALCULATOR.sub("", answer)
    worked, marker, final = text.rpartition("####")
    if not marker:  # not a GSM8K solution after all: keep it whole rather than invent a final answer
        return f"Question: {question.strip()}\nAnswer: {text.strip()}"
    return render_document(question, worked, final.strip())


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) for every non-blank line of a small JSONL file (evaluation sets)."""
    try:
        handle = open(path, encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path} does not exist (expected a JSONL file)") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not valid JSON ({error.msg})") from None


def read_gsm8k(path) -> list[dict]:
    """Rows ``{"question": str, "answer": str}`` of a GSM8K JSONL file."""
    rows = []
    for number, row in read_jsonl(path):
        if not (isinstance(row, dict) and all(isinstance(row.get(key), str) for key in ("question", "answer"))):
            raise DataError(f"{path} line {number}: expected {{\"question\": str, \"answer\": str}}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no GSM8K rows")
    return rows


def read_mc_items(path) -> list[dict]:
    """Rows ``{"context": str, "choices": [str, ...], "gold": int}`` of a multiple-choice JSONL file, checked."""
    items = []
    for number, row in read_jsonl(path):
        ok = (
            isinstance(row, dict) and isinstance(row.get("context"), str) and row["context"]
            and isinstance(row.get("choices"), list) and len(row["choices"]) >= 2
            and all(isinstance(choice, str) and choice for choice in row["choices"])
            and isinstance(row.get("gold"), int) and 0 <= row["gold"] < len(row["choices"])
        )
        if not ok:
            raise DataError(
                f"{path} line {number}: expected {{\"context\": non-empty str, \"choices\": [>= 2 non-empty str], "
                f"\"gold\": index of the right choice}}, got {json.dumps(row)[:120]}"
            )
        items.append(row)
    if not items:
        raise DataError(f"{path} holds no multiple-choice rows")
    return items
