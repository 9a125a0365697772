"""Bounds always hold (#19.2, #19.3, #19.6): a bound that cannot hold is refused before anything
runs -- exit 2, one line on stderr naming our option, no traceback -- and the open-loop rate has
one ceiling (harness.arrivals.MAX_RATE) however it is set."""
from __future__ import annotations

import sys

import pytest

from harness import cli
from harness.arrivals import MAX_RATE, check_rate
from loadrun import Run

BASE = ["load", "--url", "http://127.0.0.1:9"]


@pytest.mark.parametrize("extra, option", [
    (["--rate", "1e9"], "--rate"),
    (["--rate", "inf"], "--rate"),
    (["--rate", "nan"], "--rate"),
    (["--duration", "0"], "--duration"),
    (["--duration", "0.5"], "--duration"),
    (["--duration", "-10"], "--duration"),
    (["--duration", "inf"], "--duration"),
    (["--num-requests", "-3"], "--num-requests"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--max-concurrency", "-1"], "--max-concurrency"),
    (["--warmup", "10"], "--warmup"),
    (["--warmup", "3", "--cooldown", "2"], "--warmup"),
    (["--request-deadline", "0"], "--request-deadline"),
    (["--max-response-bytes", "-1"], "--max-response-bytes"),
    (["--url", "http://127.0.0.1:99999"], "--url"),
    (["--url", "http://127.0.0.1:0"], "--url"),
    (["--locustfile", "no/such/locustfile.py"], "--locustfile"),
])
def test_each_bad_bound_is_one_line_naming_our_option(extra, option, tmp_path, capsys):
    out = tmp_path / "run"
    argv = BASE + ["--out", str(out)] + ([] if "--duration" in extra else ["--duration", "5"]) + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("harness load: error: ") and option in err, err
    assert not out.exists()   # nothing ran, nothing was written


def test_out_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub", "/proc/no-such-dir/run"):
        assert cli.main(BASE + ["--duration", "5", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--out" in err, err
    assert a_file.read_text() == "x"


def test_the_rate_ceiling_says_why():
    assert check_rate(MAX_RATE) == MAX_RATE and check_rate("2.5") == 2.5 and check_rate(0) == 0.0
    for bad in (MAX_RATE * 1.01, 1e300, float("inf"), float("nan"), -1, True, [1], None, "fast"):
        with pytest.raises(ValueError) as e:
            check_rate(bad)
        assert "requests/s" in str(e.value)
    with pytest.raises(ValueError, match="load generator"):
        check_rate(1e9)


def test_plain_locust_refuses_an_absurd_llm_rate_in_one_line(tmp_path):
    rc, log = Run([sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--headless",
                   "--host", "http://127.0.0.1:9", "-u", "1", "-r", "1", "--run-time", "2s",
                   "--llm-rate", "1e9", "--llm-out", str(tmp_path / "run")]).wait(60)
    assert rc == 2, log
    lines = [ln for ln in log.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and "--llm-rate" in lines[0] and "too high" in lines[0], log
    assert "Traceback" not in log


def test_plain_locust_refuses_a_negative_request_deadline(tmp_path):
    rc, log = Run([sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--headless",
                   "--host", "http://127.0.0.1:9", "--llm-request-deadline", "-1",
                   "--llm-out", str(tmp_path / "run")]).wait(60)
    assert rc == 2 and "--llm-request-deadline" in log and "Traceback" not in log, log

