"""One atomic JSON writer and one JSONL reader (harness/json_io.py, issue #15 point 7): the
torn last line of a file still being written is skipped, a malformed line elsewhere is an error
naming the file and line, and a write replaces the file whole."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.json_io import JsonlError, read_jsonl, write_json


def test_a_torn_last_line_is_a_write_in_progress_and_skipped(tmp_path: Path):
    p = tmp_path / "requests.jsonl"
    p.write_bytes(b'{"id": 1}\n\n{"id": 2}\n{"id": 3, "ttft')
    assert read_jsonl(p) == [{"id": 1}, {"id": 2}]


def test_a_whole_last_line_without_its_newline_is_still_in_progress(tmp_path: Path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"id": 1}\n{"id": 2}')
    assert read_jsonl(p) == [{"id": 1}]


def test_a_malformed_line_elsewhere_names_the_file_and_line(tmp_path: Path):
    p = tmp_path / "timeseries.jsonl"
    p.write_bytes(b'{"t": 1}\n{"t": 2,, }\n{"t": 3}\n')
    with pytest.raises(JsonlError, match=r"timeseries\.jsonl:2: not a JSON line"):
        read_jsonl(p)


def test_a_missing_file_is_empty_only_when_allowed(tmp_path: Path):
    assert read_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl")


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path):
    p = tmp_path / "deep" / "summary.json"
    write_json(p, {"a": 1, "when": Path("/x")})
    write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2} and p.read_text().endswith("}\n")
    assert [q.name for q in p.parent.iterdir()] == ["summary.json"]
    with pytest.raises(TypeError):
        write_json(p, {"bad": object()}, default=lambda o: (_ for _ in ()).throw(TypeError("no")))
    assert json.loads(p.read_text()) == {"a": 2}          # the old file survives a failed write
    assert [q.name for q in p.parent.iterdir()] == ["summary.json"]
