"""Tests for the embedded arithmetic corpus: determinism, arithmetic correctness, step counts and speed."""

from __future__ import annotations

import ast
import operator
import random
import re
import time
from fractions import Fraction

import pytest

from cacheaug.data.arithmetic import (
    MAX_STEPS,
    MIN_STEPS,
    TRAIN_SEED,
    VALIDATION_SEED,
    arithmetic_problem,
    arithmetic_problems,
    gsm8k_document,
    render_document,
)

# "a op b [op c] = result", with money signs removed first
_COMPUTATION = re.compile(r"(\d+(?:\s*[-+*/]\s*\d+)+)\s*=\s*(\d+)")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expression: str) -> Fraction:
    """Exact value of an integer arithmetic expression (Python precedence)."""
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp):
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return Fraction(node.value)
    return walk(ast.parse(expression, mode="eval").body)


def _computations(line: str) -> list[tuple[str, int]]:
    return [(expr, int(result)) for expr, result in _COMPUTATION.findall(line.replace("$", ""))]


def test_deterministic_for_a_seed() -> None:
    assert arithmetic_problems(50, 7) == arithmetic_problems(50, 7)
    assert arithmetic_problem(random.Random(3)) == arithmetic_problem(random.Random(3))


def test_different_seeds_give_different_problems() -> None:
    train = arithmetic_problems(200, TRAIN_SEED)
    validation = arithmetic_problems(200, VALIDATION_SEED)
    assert TRAIN_SEED != VALIDATION_SEED
    assert len(set(train) & set(validation)) < 5  # a rare two-step coincidence is possible, not systematic
    assert arithmetic_problems(20, 1) != arithmetic_problems(20, 2)


def test_document_format() -> None:
    for doc in arithmetic_problems(100, 11):
        question, answer_and_final = doc.split("\nAnswer: ")
        assert question.startswith("Question: ") and question.endswith("?")
        worked, final = answer_and_final.rsplit("\n#### ", 1)
        assert final.isdigit() and worked


def test_every_computation_is_correct_and_final_answer_is_last_value() -> None:
    rng = random.Random(2024)
    step_counts = set()
    for _ in range(3000):
        question, worked, final = arithmetic_problem(rng)
        lines = worked.split("\n")
        assert MIN_STEPS <= len(lines) <= MAX_STEPS, worked
        step_counts.add(len(lines))
        last = None
        for line in lines:
            found = _computations(line)
            assert len(found) == 1, f"one computation per step expected: {line!r}"
            expression, result = found[0]
            assert _evaluate(expression) == result, line
            assert result >= 0
            last = result
        assert isinstance(final, int) and final == last and final >= 0, (worked, final)
        assert question.endswith("?")
    assert step_counts == set(range(MIN_STEPS, MAX_STEPS + 1))


def test_text_is_varied() -> None:
    docs = arithmetic_problems(2000, 5)
    assert len(set(docs)) == len(docs)
    # the first sentence of the question shows which start template produced it
    openings = {re.sub(r"\d+", "N", doc.split(". ")[0].split(" ", 2)[-1]) for doc in docs}
    assert len(openings) > 50
    verbs = {line.split(" = ")[0].rsplit(" ", 3)[0] for doc in docs for line in doc.split("\n")[1:-1]}
    assert len(verbs) > 40


@pytest.mark.slow  # a wall-clock bound: outside the default run, which may share a loaded machine
def test_generation_is_fast() -> None:
    start = time.perf_counter()
    docs = arithmetic_problems(10_000, TRAIN_SEED)
    elapsed = time.perf_counter() - start
    assert len(docs) == 10_000
    assert elapsed < 2.0, f"10k problems took {elapsed:.2f}s"


def test_gsm8k_rendering_matches_the_embedded_format() -> None:
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 in all.\n#### 72"
    doc = gsm8k_document("How many clips did Natalia sell? ", answer)
    assert doc == ("Question: How many clips did Natalia sell?\nAnswer: Natalia sold 48/2 = 24 clips in May.\n"
                   "She sold 48+24 = 72 in all.\n#### 72")
    assert doc == render_document("How many clips did Natalia sell?", answer.split("####")[0]
                                  .replace("<<48/2=24>>", "").replace("<<48+24=72>>", ""), 72)


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_are_integers_within_bounds(seed: int) -> None:
    rng = random.Random(seed)
    finals = [arithmetic_problem(rng)[2] for _ in range(500)]
    assert all(0 <= value <= 100_000 for value in finals)
    assert len(set(finals)) > 100
