"""A newcomer's common mistakes get one line naming the fix, exit 2, and nothing is run.

Each command here targets a live simulator, so the only thing that can stop the run
before any load is the mistake itself.
"""
from __future__ import annotations

from loadrun import harness_load

LOAD = ("--duration", "2", "--input-len", "16", "--output-len", "4")


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "error" in line]


def test_zero_users_is_refused_instead_of_running_the_default_eight(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, "--users", "0", *LOAD, "--out", str(tmp_path / "r"))
    assert rc == 2, log
    assert _error_lines(log) == ["harness load: error: --users must be at least 1 concurrent user, not 0"]
    assert not (tmp_path / "r").exists()


def test_negative_users_are_refused(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, "--users", "-2", *LOAD, "--out", str(tmp_path / "r"))
    assert rc == 2 and "--users must be at least 1" in log, log


def test_an_slo_written_as_three_shell_words_is_refused_with_the_quoted_form(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, *LOAD, "--slo", "ttft_p99_ms", "<=", "200",
                           "--out", str(tmp_path / "r"))
    assert rc == 2, log
    lines = _error_lines(log)
    assert len(lines) == 1 and "unexpected arguments: <= 200" in lines[0], log
    assert "--slo 'ttft_p99_ms<=200'" in lines[0]
    assert not (tmp_path / "r").exists()


def test_stray_words_without_an_operator_are_named_without_the_slo_hint(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, *LOAD, "extra", "--out", str(tmp_path / "r"))
    assert rc == 2, log
    assert _error_lines(log) == ["harness load: error: unexpected arguments: extra"]
