"""The LLM tab, the charts page and the rate control, in a real headless Chromium.

Debian's `chromium` and `chromium-driver` (installed by the project's setup, never
downloaded by a tool), driven by Selenium with the system browser and driver. The test
starts the simulator and `locust -f locustfiles/chat.py` in web UI mode on loopback,
starts a run from Locust's own start form, watches the LLM tab's numbers grow, opens the
charts page from the tab, checks uPlot drew the series, and changes the open-loop rate
with the page's control. On failure it saves a screenshot and the page's HTML to
`$TEST_ARTIFACTS_DIR` (default: the test's tmp directory) and shows Locust's log.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port_block

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FAST = ("--profile", "h200-llama-3-8b-awq")

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("Debian chromium and chromium-driver are not installed (apt-get install -y chromium "
                "chromium-driver); the browser test uses the system browser only",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout} s")
        time.sleep(0.2)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def locust_ui(start_sim, tmp_path):
    """Locust in web UI mode (not started) against a fast simulator; yields (ui_url, log).

    --run-time is only a backstop (teardown stops Locust): it must outlast the test's own
    bounded waits (up to ~3 min, the test's timeout), or a slow browser lets the run end
    before the open-loop windows the test waits for, which then never come."""
    sim_url, _ = start_sim(*FAST)
    port = free_port_block(1)
    log_path = tmp_path / "locust.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--host", sim_url,
         "--web-host", "127.0.0.1", "--web-port", str(port), "--run-time", "170s",
         "--llm-window", "1", "--llm-input-len", "32", "--llm-output-len", "32",
         "--llm-out", str(tmp_path / "run"), "--loglevel", "INFO"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/")
        yield url, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # the group we started (PID = its id)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def save_failure(driver, tmp_path: Path, log_path: Path) -> None:
    """Screenshot, page HTML and Locust's log tail, for a failed run."""
    out = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path) / "webui-browser"
    out.mkdir(parents=True, exist_ok=True)
    try:
        driver.save_screenshot(str(out / "failure.png"))
        (out / "failure.html").write_text(driver.page_source)
        print(f"\nbrowser screenshot and page saved in {out}")
    except WebDriverException as exc:
        print(f"\ncould not save a screenshot: {exc}")
    print("\n--- locust log (tail) ---\n" + log_path.read_text(errors="replace")[-4000:])


def fill(driver, name: str, value: str) -> None:
    el = driver.find_element(By.NAME, name)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(value)


def llm_row(driver) -> dict[str, str]:
    """The LLM tab's merged row, header title -> cell text."""
    heads = [th.text.strip() for th in driver.find_elements(By.CSS_SELECTOR, "table thead th")]
    for tr in driver.find_elements(By.CSS_SELECTOR, "table tbody tr"):
        cells = [td.text.strip() for td in tr.find_elements(By.CSS_SELECTOR, "td")]
        if cells and cells[0] == "All (merged)":
            return dict(zip(heads, cells))
    return {}


def ok_count(driver) -> int:
    try:
        return int(llm_row(driver).get("OK") or 0)
    except (ValueError, WebDriverException):
        return 0


def test_llm_tab_charts_and_rate_control(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    d = browser
    wait = WebDriverWait(d, 30, poll_frequency=0.25)
    try:
        d.get(url + "/")
        wait.until(lambda d: d.find_elements(By.NAME, "userCount"))

        # Start form: Locust's fields plus our --llm-* knobs (include_in_web_ui).
        fill(d, "userCount", "2")
        fill(d, "spawnRate", "2")
        d.find_element(By.XPATH, "//*[normalize-space(text())='Custom parameters']").click()
        for name in ("llmRate", "llmInputLen", "llmOutputLen", "llmModel", "llmSlo", "llmDataset"):
            wait.until(lambda d, n=name: d.find_element(By.NAME, n).is_displayed())
        fill(d, "llmOutputLen", "12")           # applied at test start (checked below)
        fill(d, "llmSlo", "ttft_p99_ms<=5000")
        d.find_element(By.CSS_SELECTOR, "form button[type='submit']").click()

        # The LLM tab: the merged row's numbers appear and grow.
        tab = wait.until(lambda d: d.find_element(By.XPATH, "//button[@role='tab'][normalize-space(.)='LLM']"))
        tab.click()
        wait.until(lambda d: ok_count(d) > 0)
        first = ok_count(d)
        row = llm_row(d)
        for col in ("TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "ITL p99 ms", "E2E p90 ms",
                    "Output tok/s", "Goodput req/s"):
            assert float(row[col]) > 0, (col, row)
        WebDriverWait(d, 30, poll_frequency=0.5).until(lambda d: ok_count(d) > first + 2)
        stats = get_json(url + "/llm/stats")
        total = stats["rows"][-1]
        assert stats["output_tokens"] == 12 * total["ok"], "the form's llm_output_len=12 was not applied"
        assert stats["slos"] == ["ttft_p99_ms<=5000"]

        if os.environ.get("TEST_ARTIFACTS_DIR"):
            d.save_screenshot(os.path.join(os.environ["TEST_ARTIFACTS_DIR"], "webui-llm-tab.png"))

        # The tab links to the charts page.
        link = wait.until(lambda d: d.find_element(By.ID, "llm-charts-link"))
        assert link.is_displayed()
        link.click()
        wait.until(lambda d: d.current_url.rstrip("/").endswith("/llm/charts"))
        WebDriverWait(d, 40, poll_frequency=0.5).until(
            lambda d: d.execute_script("return window.llmPoints || 0") >= 3)
        drawn = d.execute_script("""
            const out = {};
            for (const [k, u] of Object.entries(window.llmCharts)) {
              const vals = u.data.slice(1).map(s => s.filter(v => v != null).length);
              out[k] = {series: u.series.length - 1, points: vals};
            }
            // pixels of the p50 line's colour (#1976d2) on the TTFT canvas
            const c = document.querySelector('#chart-ttft canvas');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let blue = 0;
            for (let i = 0; i < px.length; i += 4)
              if (Math.abs(px[i] - 25) < 30 && Math.abs(px[i+1] - 118) < 30 && Math.abs(px[i+2] - 210) < 30 && px[i+3] > 200) blue++;
            out.ttft_blue_pixels = blue;
            return out;""")
        assert drawn["ttft"]["series"] == 2 and drawn["tpot"]["series"] == 2, drawn
        assert min(drawn["ttft"]["points"]) >= 2 and min(drawn["tpot"]["points"]) >= 2, drawn
        assert drawn["tokens"]["points"][0] >= 2, drawn
        assert drawn["server"]["points"][0] >= 2, drawn   # running requests, scraped from the sim
        assert drawn["ttft_blue_pixels"] > 50, drawn

        # Rate control: closed loop -> 6 requests/s open loop on the running test.
        rate_in = d.find_element(By.ID, "rate-input")
        rate_in.send_keys(Keys.CONTROL, "a")
        rate_in.send_keys("6")
        d.find_element(By.ID, "rate-submit").click()
        wait.until(lambda d: "rate set to 6" in d.find_element(By.ID, "rate-status").text)
        wait.until(lambda d: d.find_element(By.ID, "st-rate").text.startswith("6.00"))
        changed_at = time.time()
        assert get_json(url + "/llm/stats")["rate"] == 6.0

        def open_loop_windows():
            lines = get_json(url + f"/llm/timeseries?since={changed_at}")["lines"]
            return [ln for ln in lines if ln["target_rate"] == 6.0 and ln["completed"] > 0]
        WebDriverWait(d, 30, poll_frequency=1).until(lambda d: len(open_loop_windows()) >= 3)
        lines = open_loop_windows()
        assert all(ln["errors_by_kind"] == {} for ln in lines), lines
        sched = [ln["schedule_lag_ms"]["count"] for ln in lines]
        assert sum(sched) > 0, f"no open-loop (scheduled) request finished after the change: {lines}"
        if os.environ.get("TEST_ARTIFACTS_DIR"):
            d.save_screenshot(os.path.join(os.environ["TEST_ARTIFACTS_DIR"], "webui-charts.png"))
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise


# -- the LLM tab: layout, empty cells, live SLOs, and the results of each test it stops --------

DASH = "\u2013"


def start_test(d, wait, users: int, **llm: str) -> None:
    """Fill and submit the start form (the first one, or the one NEW opens after a stop):
    `users` users, and the --llm-* fields given (llm_slo="...", llm_output_len="1")."""
    scope = d.find_elements(By.CSS_SELECTOR, "[role='dialog']") or [d]
    form = scope[0]
    wait.until(lambda _d: form.find_elements(By.NAME, "userCount"))
    for name, value in (("userCount", str(users)), ("spawnRate", str(users))):
        fill(form, name, value)
    if llm:
        form.find_element(By.XPATH, ".//*[normalize-space(text())='Custom parameters']").click()
        for key, value in llm.items():
            name = "".join(w if i == 0 else w.capitalize() for i, w in enumerate(key.split("_")))
            wait.until(lambda _d, n=name: form.find_element(By.NAME, n).is_displayed())
            fill(form, name, value)
    form.find_element(By.CSS_SELECTOR, "form button[type='submit']").click()


def open_llm_tab(d, wait) -> None:
    wait.until(lambda d: d.find_element(By.XPATH, "//button[@role='tab'][normalize-space(.)='LLM']")).click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "th[data-sortkey='ttftP50']"))


def llm_rows(d) -> list[dict[str, str]]:
    """Every row of the LLM tab's table, header title -> cell text (the tab's own table only)."""
    return d.execute_script("""
        const box = document.querySelector("th[data-sortkey='ttftP50']").closest('table');
        const heads = [...box.querySelectorAll('thead th')].map(th => th.innerText.replace(/\\s+/g, ' ').trim());
        return [...box.querySelectorAll('tbody tr')].map(tr => Object.fromEntries(
            [...tr.querySelectorAll('td')].map((td, i) => [heads[i], td.innerText.trim()])));""")


def endpoint_row(d) -> dict[str, str]:
    rows = [r for r in llm_rows(d) if r.get("Endpoint [model]", "").startswith("/v1/chat/completions")]
    return rows[0] if rows else {}


def count(row: dict[str, str], col: str = "OK") -> int:
    try:
        return int(row.get(col) or 0)
    except ValueError:
        return 0


def panel_notes(d) -> list[str]:
    return d.execute_script("return [...document.querySelectorAll('#llm-panel #llm-notes li')]"
                            ".map(li => li.innerText)")


def slo_panel(d) -> dict[str, tuple[str, str, str]]:
    """The panel's SLO table: SLO text -> (value now, verdict, verdict colour), read at once
    (the panel is redrawn with each answer)."""
    return {r[0]: tuple(r[1:]) for r in d.execute_script("""
        return [...document.querySelectorAll('#llm-slo-table tr[data-slo]')].map(tr => {
            const td = [...tr.querySelectorAll('td')];
            return [td[0].innerText, td[1].innerText, td[2].innerText, getComputedStyle(td[2]).color];
        });""")}


def click_button(d, wait, label: str) -> None:
    wait.until(lambda d: d.find_element(By.XPATH, f"//button[normalize-space(.)='{label}']")).click()


def runner_state(url: str) -> str | None:
    return get_json(url + "/stats/requests").get("state")


def test_llm_tab_fits_a_1400_px_window(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    d, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.25)
    try:
        d.get(url + "/")
        start_test(d, wait, 2, llm_output_len="12")
        open_llm_tab(d, wait)
        wait.until(lambda d: count(endpoint_row(d)) > 0)
        size = d.execute_script("""
            const box = document.querySelector("th[data-sortkey='ttftP50']").closest('.MuiTableContainer-root');
            return {inner: window.innerWidth, page: document.documentElement.scrollWidth,
                    box: box.scrollWidth, box_visible: box.clientWidth};""")
        assert size["inner"] == 1400, size
        assert size["page"] <= size["inner"], f"the page scrolls sideways: {size}"
        # every one of the 19 columns in view: the table's own box does not scroll either
        assert size["box"] <= size["box_visible"], f"the LLM table is wider than its box: {size}"
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise


def test_llm_tab_per_endpoint_row_has_no_blank_cell(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    d, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.25)
    try:
        d.get(url + "/")
        start_test(d, wait, 2, llm_output_len="12")
        open_llm_tab(d, wait)
        wait.until(lambda d: count(endpoint_row(d)) > 0)
        rows = llm_rows(d)
        assert len(rows) == 2 and rows[-1]["Endpoint [model]"] == "All (merged)", rows
        for row in rows:
            assert len(row) == 19 and all(v for v in row.values()), row
            assert DASH not in row.values(), row   # 12-token outputs: every value is measured
        row = endpoint_row(d)
        assert row["Failed"] == "0" and row["Errors by kind"] == "none", row
        assert float(row["Req/s"]) > 0 and float(row["Output tok/s"]) > 0, row
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise


def test_a_dash_in_the_llm_tab_comes_with_its_reason(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    d, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.25)
    try:
        d.get(url + "/")
        start_test(d, wait, 2, llm_output_len="1")   # TPOT and ITL need two tokens
        open_llm_tab(d, wait)
        wait.until(lambda d: count(endpoint_row(d)) > 0 and panel_notes(d))
        row = endpoint_row(d)
        dashed = sorted(k for k, v in row.items() if v == DASH)
        assert dashed == sorted(f"{m} {p} ms" for m in ("TPOT", "ITL") for p in ("p50", "p90", "p99")), row
        assert all(v for v in row.values()), row
        name = row["Endpoint [model]"]
        notes = panel_notes(d)
        for metric in ("TPOT", "ITL"):
            assert any(n.startswith(f"{name}: {metric} {DASH}") and "more than one token" in n
                       for n in notes), notes
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise


def test_slos_from_the_start_form_show_live_pass_and_fail(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    d, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.25)
    passes, fails, grows = "ttft_p99_ms<=5000", "ttft_p50_ms<=0.01", "requests_completed>=1000000"
    try:
        d.get(url + "/")
        start_test(d, wait, 2, llm_slo=f"{passes},{fails},{grows}")
        open_llm_tab(d, wait)
        wait.until(lambda d: len(slo_panel(d)) == 3 and all(v[1] != "not measured yet"
                                                            for v in slo_panel(d).values()))
        slos = slo_panel(d)
        value, verdict, pass_colour = slos[passes]
        assert verdict == "PASS" and 0 < float(value) <= 5000, slos
        value, verdict, fail_colour = slos[fails]
        assert verdict == "FAIL" and float(value) > 0.01, slos
        assert pass_colour != fail_colour, slos
        first = float(slos[grows][0])
        assert slos[grows][1] == "FAIL" and first >= 1, slos
        # live: the panel follows the run while it goes on
        WebDriverWait(d, 30, poll_frequency=0.5).until(lambda d: float(slo_panel(d)[grows][0]) > first)
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise


def ok_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["ok"])


def stop_and_read_summary(d, wait, url: str, out: Path, after: float) -> dict:
    """STOP in the UI; the summary.json the stop writes (one newer than `after`), Locust still up."""
    click_button(d, wait, "Stop")
    WebDriverWait(d, 30, poll_frequency=0.25).until(lambda d: runner_state(url) == "stopped")

    def fresh():
        try:
            s = json.loads((out / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return s if s["started_at"] > after else None
    return WebDriverWait(d, 15, poll_frequency=0.25).until(lambda d: fresh())


def test_stopping_a_ui_test_writes_its_summary(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    out = tmp_path / "run"
    d, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.25)
    try:
        d.get(url + "/")
        t0 = time.time()
        start_test(d, wait, 2, llm_slo="ttft_p99_ms<=5000")
        open_llm_tab(d, wait)
        wait.until(lambda d: count(endpoint_row(d)) >= 5)
        s = stop_and_read_summary(d, wait, url, out, after=t0 - 1)
        assert s["requests"]["completed"] == ok_lines(out / "requests.jsonl") >= 5, s["requests"]
        assert s["slo"]["passed"] is True and s["slo"]["checks"][0]["slo"] == "ttft_p99_ms<=5000", s["slo"]
        # the tab's totals after the stop are the summary's
        wait.until(lambda d: count(endpoint_row(d)) == s["requests"]["completed"])
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise


def test_a_second_ui_test_keeps_the_first_under_test_1(locust_ui, browser, tmp_path):
    url, log_path = locust_ui
    out = tmp_path / "run"
    d, wait = browser, WebDriverWait(browser, 30, poll_frequency=0.25)
    try:
        d.get(url + "/")
        t0 = time.time()
        start_test(d, wait, 2)
        open_llm_tab(d, wait)
        wait.until(lambda d: count(endpoint_row(d)) >= 5)
        first = stop_and_read_summary(d, wait, url, out, after=t0 - 1)
        first_lines = (out / "requests.jsonl").read_text()

        click_button(d, wait, "New")
        t1 = time.time()
        start_test(d, wait, 1)
        WebDriverWait(d, 30, poll_frequency=0.25).until(lambda d: runner_state(url) == "running")
        open_llm_tab(d, wait)
        wait.until(lambda d: get_json(url + "/llm/stats")["rows"][-1]["ok"] >= 3)
        second = stop_and_read_summary(d, wait, url, out, after=t1)
        # the tab shows the second test alone (it started from nothing, as Locust's own stats do)
        wait.until(lambda d: count(endpoint_row(d)) == second["requests"]["completed"])

        kept = out / "test-1"
        assert json.loads((kept / "summary.json").read_text()) == first
        assert (kept / "requests.jsonl").read_text() == first_lines
        assert ok_lines(kept / "requests.jsonl") == first["requests"]["completed"]
        records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
        assert sum(r["ok"] for r in records) == second["requests"]["completed"] >= 3
        assert min(r["sent_at"] for r in records) >= t1 - 0.5, "the first test's requests in the second's file"
        assert second["started_at"] >= t1 - 0.5
        assert not (out / "test-2").exists()
    except BaseException:
        save_failure(d, tmp_path, log_path)
        raise
