"""k15.tasks.jsonl: JSONL prompt files, bad rows named by file and line,
fail vs skip-with-count."""

import json
import logging

import pytest

from k15 import rewards
from k15.tasks import jsonl

GOOD = [
  {"question": "What is 6 * 7?", "answer": "42", "difficulty": 2},
  {"prompt": "Add 1 and 2.", "answer": 3, "kind": "exact", "id": "q2"},
  {
    "question": "def f(): ...",
    "kind": "code",
    "entry_point": "f",
    "tests": ["assert f() == 1"],
  },
  {"question": "Half of 5?", "answer": 2.5, "trace": "5 / 2 = 2.5"},
]

# (line text, reason counted when skipped, words the error must contain)
BAD = [
  ('{"question": "x", "answer": "1"', "bad_json", "not valid JSON"),
  (b"\xff\xfe not utf-8", "bad_json", "UTF-8"),
  ('["question", "answer"]', "not_object", "got list"),
  ('{"answer": "1"}', "missing_field", "'question'"),
  ('{"question": "What?"}', "missing_field", "'answer'"),
  ('{"question": 12, "answer": "1"}', "wrong_type", "'question'"),
  ('{"question": "Q?", "answer": ["1"]}', "wrong_type", "'answer'"),
  ('{"question": "Q?", "answer": true}', "wrong_type", "'answer'"),
  (
    '{"question": "Q?", "answer": "1", "difficulty": "hard"}',
    "wrong_type",
    "'difficulty'",
  ),
  (
    '{"question": "Q?", "answer": "1", "difficulty": 1.5}',
    "wrong_type",
    "'difficulty'",
  ),
  (
    '{"question": "Q?", "answer": "1", "difficulty": -1}',
    "bad_value",
    "'difficulty'",
  ),
  (
    '{"question": "Q?", "answer": "1", "kind": "poetry"}',
    "bad_value",
    "'kind'",
  ),
  ('{"question": "Q?", "answer": "1", "trace": 7}', "wrong_type", "'trace'"),
  ('{"question": "   ", "answer": "1"}', "empty_prompt", "empty"),
  ('{"prompt": "", "answer": "1"}', "empty_prompt", "'prompt' is empty"),
  ('{"question": "Q?", "answer": " "}', "empty_answer", "'answer' is empty"),
  ('{"question": "Q?", "prompt": "Q?", "answer": "1"}', "bad_value", "both"),
  ('{"question": "f", "kind": "code"}', "missing_field", "'tests'"),
  ('{"question": "f", "kind": "code", "tests": []}', "wrong_type", "'tests'"),
  (
    '{"question": "' + "long " * 40 + '", "answer": "1"}',
    "oversize_prompt",
    "max_prompt_tokens=100",
  ),
  ('{"question": "What is 6 * 7?", "answer": "42"}', "duplicate", "line 1"),
  (
    '{"question": "f", "kind": "code", "tests": ["assert f() == 1"]}',
    "fakeable_tests",
    "test_mode: test mode 'assert' runs the tests inside the program's "
    "process, where it can fake a pass",
  ),
  (
    '{"question": "f", "kind": "code", "tests": [{"args": [1]}]}',
    "wrong_type",
    "'tests' should be all code strings",
  ),
  (
    '{"question": "f", "kind": "code", "tests": [{"args": [1], '
    '"expected": 2}]}',
    "missing_field",
    "'entry_point' (test mode 'call')",
  ),
  (
    '{"question": "f", "kind": "code", "entry_point": "f", "test_mode": '
    '"stdio", "tests": [{"args": [1], "expected": 2}]}',
    "bad_value",
    "'test_mode'='stdio' does not fit",
  ),
  (
    '{"question": "Q?", "answer": "1", "domain": "d3"}',
    "bad_value",
    "'domain'",
  ),
  (
    '{"question": "Q?", "answer": "1", "difficulty_pass_rate": 1.5}',
    "bad_value",
    "'difficulty_pass_rate'=1.5",
  ),
]


def _write(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      if isinstance(line, dict):
        line = json.dumps(line)
      f.write(line if isinstance(line, bytes) else line.encode())
      f.write(b"\n")
  return str(path)


def test_kinds_match_the_reward_registry():
  assert jsonl.KINDS == rewards.KINDS


def test_good_rows_are_normalised(tmp_path):
  path = _write(tmp_path / "p.jsonl", [*GOOD[:2], "", "  ", *GOOD[2:]])
  rows, report = jsonl.load(jsonl.JsonlConfig(path=path, max_prompt_tokens=100))
  assert (report.rows, report.kept, report.num_skipped) == (4, 4, 0)
  assert [r["question"] for r in rows] == [
    "What is 6 * 7?",
    "Add 1 and 2.",
    "def f(): ...",
    "Half of 5?",
  ]
  assert [r["answer"] for r in rows] == ["42", "3", "", "2.5"]
  assert [r["difficulty"] for r in rows] == [2, 0, 0, 0]
  assert [r["kind"] for r in rows] == ["math", "exact", "code", "math"]
  assert rows[3]["trace"] == "5 / 2 = 2.5" and rows[0]["trace"] == ""
  assert rows[1]["id"] == "q2" and "prompt" not in rows[1]
  assert rows[2]["tests"] == ["assert f() == 1"]
  assert [r["domain"] for r in rows] == ["math", "math", "code", "math"]


@pytest.mark.parametrize("line, reason, words", BAD)
def test_a_bad_row_fails_naming_file_and_line(tmp_path, line, reason, words):
  del reason
  path = _write(tmp_path / "p.jsonl", [GOOD[0], "", line, GOOD[1]])
  cfg = jsonl.JsonlConfig(path=path, max_prompt_tokens=100)
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.load(cfg)
  msg = str(e.value)
  assert msg.startswith(f"{path}:3: "), msg  # blank lines count as lines
  assert words in msg, msg


def test_skip_mode_drops_bad_rows_and_counts_them(tmp_path, caplog):
  lines = [GOOD[0], *[b for b, _, _ in BAD], GOOD[1], GOOD[2], GOOD[3]]
  path = _write(tmp_path / "p.jsonl", lines)
  cfg = jsonl.JsonlConfig(path=path, on_error="skip", max_prompt_tokens=100)
  with caplog.at_level(logging.WARNING):
    rows, report = jsonl.load(cfg)
  assert [r["question"] for r in rows] == [
    g.get("question", g.get("prompt")) for g in GOOD
  ]
  assert report.rows == len(BAD) + 4 and report.kept == 4
  want = {}
  for _, reason, _ in BAD:
    want[reason] = want.get(reason, 0) + 1
  assert report.skipped == want
  assert report.errors[0].startswith(f"{path}:2: ")
  assert len(report.errors) == 10  # the first ten, for the log
  assert f"skipped {len(BAD)} of {len(BAD) + 4} rows" in caplog.text


def test_oversize_uses_the_given_token_counter(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"question": "a b c d", "answer": "1"}])
  words = lambda s: len(s.split())
  cfg = jsonl.JsonlConfig(path=path, max_prompt_tokens=4)
  assert jsonl.load(cfg, count_tokens=words)[1].kept == 1
  cfg = jsonl.JsonlConfig(path=path, max_prompt_tokens=3)
  with pytest.raises(jsonl.JsonlError, match=r"p\.jsonl:1: prompt has 4 "):
    jsonl.load(cfg, count_tokens=words)


def test_no_usable_rows_fails_even_when_skipping(tmp_path):
  path = _write(tmp_path / "p.jsonl", ["{", '{"answer": 1}'])
  with pytest.raises(jsonl.JsonlError, match="no usable rows .2 bad rows"):
    jsonl.load(jsonl.JsonlConfig(path=path, on_error="skip"))
  empty = _write(tmp_path / "e.jsonl", ["", " "])
  with pytest.raises(jsonl.JsonlError, match="e.jsonl: no usable rows$"):
    jsonl.load(jsonl.JsonlConfig(path=empty))


def test_missing_file_and_bad_options_are_named(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(jsonl.JsonlError, match="nope.jsonl: cannot open"):
    jsonl.load(jsonl.JsonlConfig(path=missing))
  with pytest.raises(ValueError, match="on_error='ignore'"):
    jsonl.JsonlConfig(path=missing, on_error="ignore")
  with pytest.raises(ValueError, match="max_prompt_tokens=-1"):
    jsonl.JsonlConfig(path=missing, max_prompt_tokens=-1)
  with pytest.raises(ValueError, match="default_kind='poetry'"):
    jsonl.JsonlConfig(path=missing, default_kind="poetry")


def test_image_rows_name_a_missing_file_and_the_line(tmp_path):
  np = pytest.importorskip("numpy")
  np.save(tmp_path / "ok.npy", np.zeros((6, 6, 3), np.uint8))
  path = tmp_path / "v.jsonl"
  good = {"question": "<image> count r", "answer": "1", "image": "ok.npy"}
  bad = {"question": "<image> count r", "answer": "2", "image": ["gone.png"]}
  path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(jsonl.JsonlError, match=r"v.jsonl:2: image 0: image "
                     r"file .*gone.png does not exist"):
    jsonl.load(jsonl.JsonlConfig(path=str(path)))
  rows, report = jsonl.load(jsonl.JsonlConfig(path=str(path),
                                              on_error="skip"))
  assert [r["answer"] for r in rows] == ["1"]
  assert report.skipped == {"bad_image": 1}
  two = dict(good, question="<image> <image> count r", answer="3")
  path.write_text(json.dumps(two) + "\n")
  with pytest.raises(jsonl.JsonlError, match=r"v.jsonl:1: the question has "
                     r"2 <image> markers but the row has 1 images"):
    jsonl.load(jsonl.JsonlConfig(path=str(path)))
