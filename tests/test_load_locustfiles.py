"""The plain `locust -f locustfiles/...` path: the same users and the same results
directory as `harness load`, with Locust's own command line."""
from __future__ import annotations

from harness.results import summary_from_requests
from loadrun import locust, locust_aggregated, read_jsonl, summary

# About the plain-locust path, not generator health: a busy shared machine's CPU samples must
# not turn the exit code into 3.
NO_CPU_CHECK = ("--llm-cpu-limit", "1000")


def _check_results(out, n_min=4):
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) >= n_min
    s = summary(out)
    assert s["schema"] == 1
    again = summary_from_requests(records)
    assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == len(records)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert s[key] == again[key], key
    assert int(locust_aggregated(out)["Request Count"]) == len(records)
    assert (out / "timeseries.jsonl").exists()
    return records, s


def test_plain_locust_chat_locustfile_writes_the_results_directory(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rc, log = locust("-f", "locustfiles/chat.py", "--headless", "--host", url, "-u", "4", "-r", "4",
                     "--run-time", "5s", "--llm-out", str(out), "--llm-input-len", "32",
                     "--llm-output-len", "8", "--csv", str(out / "locust"), "--only-summary", *NO_CPU_CHECK)
    assert rc == 0, log
    records, s = _check_results(out)
    assert {r["user_class"] for r in records} == {"Chat"}
    assert all(r["url"] == url + "/v1/chat/completions" and r["ok"] for r in records)
    assert all(r["input_tokens"] == 32 and r["output_tokens"] == 8 for r in records)


def test_plain_locust_completions_locustfile(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rc, log = locust("-f", "locustfiles/completions.py", "--headless", "--host", url, "-u", "2",
                     "-r", "2", "--run-time", "4s", "--llm-out", str(out), "--llm-input-len", "32",
                     "--llm-output-len", "8", "--csv", str(out / "locust"), "--only-summary", *NO_CPU_CHECK)
    assert rc == 0, log
    records, s = _check_results(out)
    assert {r["user_class"] for r in records} == {"Completions"}
    assert all(r["url"].endswith("/v1/completions") and r["output_tokens"] == 8 for r in records)
    assert all(r["input_tokens"] == 32 for r in records)


def test_mixed_locustfile_reports_each_fleet_by_name(start_sim, tmp_path):
    small, _ = start_sim("--served-model-name", "small-8b")
    large, _ = start_sim("--served-model-name", "large-70b")
    out = tmp_path / "run"
    rc, log = locust("-f", "locustfiles/mixed.py", "--headless", "-u", "4", "-r", "4",
                     "--run-time", "5s", "--llm-out", str(out), "--llm-input-len", "32",
                     "--llm-output-len", "8", "--csv", str(out / "locust"), "--only-summary", *NO_CPU_CHECK,
                     env={"LLM_SMALL_URL": small, "LLM_LARGE_URL": large})
    assert rc == 0, log
    records, s = _check_results(out)
    classes = {r["user_class"]: r for r in records}
    assert set(classes) == {"SmallModelChat", "LargeModelCompletions"}
    assert classes["SmallModelChat"]["model"] == "small-8b"
    assert classes["SmallModelChat"]["url"] == small + "/v1/chat/completions"
    assert classes["LargeModelCompletions"]["model"] == "large-70b"
    assert classes["LargeModelCompletions"]["url"] == large + "/v1/completions"
    by_name = s["by_name"]
    assert set(by_name) == {"/v1/chat/completions [small-8b]", "/v1/completions [large-70b]"}
    for name, cls in (("/v1/chat/completions [small-8b]", "SmallModelChat"),
                      ("/v1/completions [large-70b]", "LargeModelCompletions")):
        mine = [r for r in records if r["user_class"] == cls]
        assert by_name[name]["ttft_ms"] == summary_from_requests(mine)["ttft_ms"]
