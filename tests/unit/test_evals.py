"""Benchmarks read from files in each public schema (tests/eval_fixtures.py), LiveCodeBench's
decoding, windows and output comparison, and the scoring and report of known responses."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from megatron_klear.errors import DataError
from megatron_klear.evals import livecodebench
from megatron_klear.evals.benchmarks import BENCHMARKS, load_problems
from megatron_klear.evals.scoring import at_k, read_responses, score_problems, summarize
from megatron_klear.rewards.code import CodeRewardConfig, extract_code_lcb, outputs_match_lcb, stdout_matches
from megatron_klear.rewards.sandbox import available_backends
from tests import eval_fixtures as fx


def test_math_benchmarks_read_each_public_schema(tmp_path):
    h4, _ = load_problems("aime24", [fx.aime24_parquet(tmp_path / "aime_2024.parquet")])
    assert [(p.id, p.answer) for p in h4] == [("60", "5"), ("61", "\\frac{3}{4}")]
    assert h4[0].messages == [{"role": "user", "content": "Find $2+3$."}] and h4[0].ability == "math"
    y25, _ = load_problems("aime25", [fx.aime25_jsonl(tmp_path / "aime25.jsonl")], instruction="Box it.")
    assert [(p.id, p.answer) for p in y25] == [("0", "42"), ("1", "2")]  # no id column: the row number
    assert y25[0].messages[0]["content"] == "What is 6 times 7?\n\nBox it."
    [klear], _ = load_problems("aime24", [fx.klear_aime_jsonl(tmp_path / "aime24.qs.jsonl")])
    assert (klear.id, klear.answer, klear.messages[0]["content"]) == ("2024-II-1", "73", "Find 70 + 3.")
    [hmmt], _ = load_problems("hmmt25", [fx.hmmt_jsonl(tmp_path / "hmmt.jsonl")])
    assert (hmmt.id, hmmt.answer) == ("1", "5")
    # other column names, dotted into objects
    odd = fx.write_jsonl(tmp_path / "odd.jsonl", [{"q": {"text": "Find 1+1."}, "gold": "2", "key": "a"}])
    [p], _ = load_problems("aime25", [odd], question_key="q.text", answer_key="gold", id_key="key")
    assert (p.id, p.answer, p.messages[0]["content"]) == ("a", "2", "Find 1+1.")


def test_math_rows_that_cannot_be_scored_are_errors_naming_the_line(tmp_path):
    dup = fx.write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "a", "answer": "1"}] * 2)
    with pytest.raises(DataError, match=r"dup.jsonl: line 2: id '1' repeats .*line 1"):
        load_problems("aime24", [dup])
    none = fx.write_jsonl(tmp_path / "none.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(DataError, match=r"none.jsonl: line 2: not a aime24 row: no answer field"):
        load_problems("aime24", [none])
    with pytest.raises(DataError, match="no question field"):
        load_problems("aime24", [fx.write_jsonl(tmp_path / "q.jsonl", [{"text": "a", "answer": "1"}])])


def test_livecodebench_rows_decode_and_select_their_windows(tmp_path):
    path = fx.livecodebench_jsonl(tmp_path / "test6.jsonl")
    v5, stats5 = load_problems("lcb_v5", [path])
    v6, stats6 = load_problems("lcb_v6", [path])
    every, _ = load_problems("livecodebench", [path])
    assert [p.id for p in v5] == ["3000"] and stats5 == {"rows": 4, "outside_window": 3}
    assert [p.id for p in v6] == ["abc400_a"] and stats6["outside_window"] == 3
    assert [p.id for p in every] == ["abc400_a", "3000", "abc360_a", "abc410_a"]
    [fn] = v5  # compressed private tests, after the public ones, as LiveCodeBench grades
    assert fn.tests == fx.TWO_SUM + fx.TWO_SUM_PRIVATE and fn.fn_name == "twoSum" and fn.difficulty == "medium"
    assert fx.STARTER in fn.messages[0]["content"] and "```python" in fn.messages[0]["content"]
    [stdin] = v6
    assert stdin.tests == fx.ADD_STDIN + fx.ADD_PRIVATE and stdin.fn_name is None
    assert "standard input" in stdin.messages[0]["content"]
    # windows: LiveCodeBench's inclusive bounds, and our own
    day = livecodebench.contest_day("2025-02-01T00:00:00")
    assert livecodebench.in_window(day, "2024-08-01", "2025-02-01") and livecodebench.in_window(day, "2025-02-01", None)
    assert [p.id for p in load_problems("livecodebench", [path], start_date="2025-05-01")[0]] == ["abc410_a"]


class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


def test_livecodebench_pickles_yield_json_only(tmp_path):
    assert livecodebench.decode_test_cases(fx.compressed(fx.ADD_PRIVATE), "p") == fx.ADD_PRIVATE
    evil = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        livecodebench.decode_test_cases(evil, "private_test_cases")
    row = fx.lcb_row("x", "2025-03-01T00:00:00", "easy", fx.ADD_STDIN, evil)
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: .*private_test_cases is neither JSON nor"):
        load_problems("lcb_v6", [fx.write_jsonl(tmp_path / "bad.jsonl", [row])])
    no_func = fx.lcb_row("y", "2025-03-01T00:00:00", "easy", fx.TWO_SUM, "[]")
    with pytest.raises(DataError, match="functional tests need fn_name"):
        load_problems("lcb_v6", [fx.write_jsonl(tmp_path / "nofunc.jsonl", [no_func])])


def test_livecodebench_output_comparison_and_extraction():
    assert outputs_match_lcb("3\n", "3") and outputs_match_lcb("1.0 2\n", "1 2.00")  # Decimal-equal tokens
    assert outputs_match_lcb("  1  2 \nab\n", "1  2\nab")
    assert not outputs_match_lcb("1 2", "1  2x") and not outputs_match_lcb("a b", "a  b")
    assert not outputs_match_lcb("1\n\n2", "1\n2")  # an empty line inside counts
    assert not outputs_match_lcb("3.0000001", "3")  # no tolerance
    assert stdout_matches("3.0000001", "3", "tolerant") and not stdout_matches("3.0", "3", "exact")
    assert stdout_matches(" 3\n", "3", "exact") and not stdout_matches("1  2", "1 2", "exact")
    text = "<think>```python\nx = 1\n```</think>\nSo:\n```python\nprint(2)\n```\ndone"
    assert extract_code_lcb(text) == "print(2)" and extract_code_lcb("```only one") is None


def test_protocols_are_the_papers():
    for name in ("aime24", "aime25", "hmmt25"):
        assert (BENCHMARKS[name].k, BENCHMARKS[name].ability) == (64, "math")
    for name, window in (("lcb_v5", ("2024-08-01", "2025-02-01")), ("lcb_v6", ("2025-02-01", "2025-05-01"))):
        p = BENCHMARKS[name]
        assert (p.k, p.ability, (p.start_date, p.end_date)) == (8, "code", window)
    assert {(p.temperature, p.top_p) for p in BENCHMARKS.values()} == {(0.6, 0.95)}
    assert at_k([[True, False], [False, False]]) == {"avg@2": 0.25, "pass@2": 0.5}


@pytest.mark.skipif(not available_backends(), reason="no usable sandbox")
def test_known_responses_score_as_by_hand(tmp_path):
    """Math: the published lenient scoring vs our strict rule; code: all tests or nothing, the
    functional problem graded after LiveCodeBench's imports (its solution uses ``List``)."""
    math, _ = load_problems("aime25", [fx.aime25_jsonl(tmp_path / "a.jsonl")])
    responses = [
        ["<think>6*7</think> The answer is \\boxed{42}.", "It is 42", "<think>x</think> \\boxed{41}"],
        ["<think>1+1</think> \\boxed{2}", "<think>1+1</think> \\boxed{3}", "<think>1+1", ],
    ]  # fmt: skip
    scored = score_problems(math, responses, workers=2)
    assert [[r.correct for r in rs] for rs in scored["score"]] == [[True, True, False], [True, False, False]]
    assert [[r.correct for r in rs] for rs in scored["strict"]] == [[True, False, False], [True, False, False]]
    report = summarize(math, scored, "aime25", {"k": 3})
    assert report["avg@3"] == pytest.approx((2 / 3 + 1 / 3) / 2) and report["pass@3"] == 1.0
    assert report["strict"] == {"avg@3": pytest.approx(1 / 3), "pass@3": 1.0}

    code, _ = load_problems("livecodebench", [fx.livecodebench_jsonl(tmp_path / "l.jsonl")])
    code = code[:2]
    responses = [
        [fx.fenced(fx.ADD_OK), fx.fenced(fx.ADD_WRONG_ON_PRIVATE)],  # the second fails only the private test
        [fx.fenced(fx.TWO_SUM_OK), fx.fenced(fx.TWO_SUM_WRONG)],  # a tuple back equals the list expected
    ]
    scored = score_problems(code, responses, workers=2)
    assert [[r.correct for r in rs] for rs in scored["score"]] == [[True, False], [True, False]]
    assert scored["score"][0][1].reason == "failed test 3 of 3" and scored["strict"] == [None, None]
    without_imports = score_problems(code[1:], responses[1:], code=CodeRewardConfig(binary=True))
    assert not without_imports["score"][0][0].correct  # List is undefined outside LiveCodeBench's imports
    report = summarize(code, scored, "livecodebench", {"k": 2})
    assert (report["avg@2"], report["pass@2"], report["sandbox_failures"]) == (0.5, 1.0, 0)
    assert report["by_difficulty"] == {"easy": {"problems": 1, "avg@2": 0.5, "pass@2": 1.0},
                                       "medium": {"problems": 1, "avg@2": 0.5, "pass@2": 1.0}}  # fmt: skip


def test_responses_files_are_checked_against_the_problems(tmp_path):
    math, _ = load_problems("aime25", [fx.aime25_jsonl(tmp_path / "a.jsonl")])
    rows = [{"id": 1, "responses": ["a", "b"]}, {"id": "0", "responses": ["c", "d"]}, {"summary": {}}]
    good = fx.write_jsonl(tmp_path / "r.jsonl", rows)
    assert read_responses(good, math) == ([["c", "d"], ["a", "b"]], [[False, False], [False, False]], 0)
    other = fx.write_jsonl(tmp_path / "o.jsonl", rows + [{"id": "7", "responses": ["e", "f"]}])
    assert read_responses(other, math)[2] == 1  # another problem's row: left out, counted
    cases = [
        ([{"id": "0", "responses": ["a"]}], "no responses for 1 problems"),
        ([{"id": "0", "responses": ["a"]}, {"id": "1", "responses": ["a", "b"]}], "same number of responses"),
        ([{"id": "0", "responses": ["a"]}] * 2, "id '0' appears twice"),
        ([{"id": "0", "responses": "a"}], r"line 1: expected \{"),
        ([{"id": "0", "responses": ["a"], "truncated": [1]}], "truncated must be a list of 1 booleans"),
    ]
    for rows, message in cases:
        with pytest.raises(DataError, match=message):
            read_responses(fx.write_jsonl(tmp_path / "bad.jsonl", rows), math)
    assert json.loads(json.dumps(BENCHMARKS["lcb_v6"].__dict__))["k"] == 8
