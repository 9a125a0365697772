// The live charts page of harness.webui: polls ./timeseries and draws with uPlot.
(function () {
  "use strict";
  var POLL_MS = 1000;
  var lastT = 0;
  var lastRev = 0;
  // Column arrays, uPlot's data layout: x first.
  var cols = {
    t: [], ttft50: [], ttft99: [], tpot50: [], tpot99: [],
    tok: [], rps: [], good: [], running: [], waiting: [], kv: []
  };
  var charts = {};
  window.llmCharts = charts;        // for tests and the console
  window.llmPoints = 0;

  function pct(line, key, p) {
    var m = line[key];
    return m && m[p] != null ? m[p] : null;
  }
  function num(v) { return v == null ? null : v; }

  function width(el) { return Math.max(320, el.clientWidth || 520); }

  function make(id, title, series, axes) {
    var el = document.getElementById(id);
    var opts = {
      title: title, width: width(el), height: 260,
      scales: { x: { time: true } },
      series: [{}].concat(series),
      axes: [{}].concat(axes)
    };
    var data = [cols.t].concat(series.map(function (s) { return cols[s.col]; }));
    var u = new uPlot(opts, data, el);
    u._cols = series.map(function (s) { return s.col; });
    return u;
  }

  function build() {
    charts.ttft = make("chart-ttft", "TTFT (ms)", [
      { label: "p50", col: "ttft50", stroke: "#1976d2", width: 2 },
      { label: "p99", col: "ttft99", stroke: "#d32f2f", width: 2 }
    ], [{ label: "ms" }]);
    charts.tpot = make("chart-tpot", "TPOT (ms per output token)", [
      { label: "p50", col: "tpot50", stroke: "#1976d2", width: 2 },
      { label: "p99", col: "tpot99", stroke: "#d32f2f", width: 2 }
    ], [{ label: "ms" }]);
    charts.tokens = make("chart-tokens", "Throughput", [
      { label: "output tok/s", col: "tok", stroke: "#2e7d32", width: 2, scale: "tok" },
      { label: "req/s", col: "rps", stroke: "#6a1b9a", width: 1, scale: "rps" },
      { label: "goodput req/s", col: "good", stroke: "#ef6c00", width: 1, scale: "rps", dash: [6, 4] }
    ], [{ label: "tok/s", scale: "tok" }, { label: "req/s", scale: "rps", side: 1, grid: { show: false } }]);
    charts.server = make("chart-server", "Server (scraped /metrics)", [
      { label: "running", col: "running", stroke: "#00838f", width: 2, scale: "n" },
      { label: "waiting", col: "waiting", stroke: "#c62828", width: 2, scale: "n" },
      { label: "KV cache %", col: "kv", stroke: "#795548", width: 1, scale: "pct", dash: [4, 3] }
    ], [{ label: "requests", scale: "n" }, { label: "KV %", scale: "pct", side: 1, grid: { show: false } }]);
  }

  function push(line) {
    var s = line.server || {};
    cols.t.push(line.t);
    cols.ttft50.push(pct(line, "ttft_ms", "p50"));
    cols.ttft99.push(pct(line, "ttft_ms", "p99"));
    cols.tpot50.push(pct(line, "tpot_ms", "p50"));
    cols.tpot99.push(pct(line, "tpot_ms", "p99"));
    cols.tok.push(num(line.output_tokens_per_s));
    cols.rps.push(num(line.requests_per_s));
    cols.good.push(num(line.goodput_rps));
    cols.running.push(num(s.num_requests_running));
    cols.waiting.push(num(s.num_requests_waiting));
    cols.kv.push(s.kv_cache_usage_perc == null ? null : 100 * s.kv_cache_usage_perc);
  }

  function redraw() {
    Object.keys(charts).forEach(function (k) {
      var u = charts[k];
      u.setData([cols.t].concat(u._cols.map(function (c) { return cols[c]; })));
    });
  }

  function fmt(v, nd) { return v == null ? "-" : Number(v).toFixed(nd); }

  function status(ts) {
    var el = document.getElementById("status");
    var last = ts.lines.length ? ts.lines[ts.lines.length - 1] : null;
    el.innerHTML = "<span>state <b id='st-state'></b></span><span>users <b id='st-users'></b></span>" +
      "<span>target rate <b id='st-rate'></b></span><span>windows <b id='st-points'></b></span>";
    document.getElementById("st-state").textContent = ts.state || "-";
    document.getElementById("st-users").textContent = ts.user_count;
    document.getElementById("st-rate").textContent = ts.rate > 0 ? fmt(ts.rate, 2) + " req/s" : "closed loop";
    document.getElementById("st-points").textContent = window.llmPoints;
    var input = document.getElementById("rate-input");
    if (document.activeElement !== input && input.value === "") input.value = ts.rate;
  }

  function poll() {
    fetch("timeseries?since=" + lastT + "&rev=" + lastRev, { cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(function (ts) {
        // earlier windows gain tokens as the requests that streamed in them finish
        (ts.revised || []).forEach(function (line) {
          var i = cols.t.indexOf(line.t);
          if (i >= 0) cols.tok[i] = num(line.output_tokens_per_s);
        });
        lastRev = ts.rev || lastRev;
        ts.lines.forEach(function (line) { push(line); lastT = Math.max(lastT, line.t); });
        window.llmPoints = cols.t.length;
        if (ts.lines.length || (ts.revised || []).length) {
          document.getElementById("empty").style.display = "none";
          redraw();
        }
        status(ts);
      })
      .catch(function (e) { document.getElementById("status").textContent = "poll failed: " + e; })
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  document.getElementById("rate-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var v = document.getElementById("rate-input").value;
    var out = document.getElementById("rate-status");
    out.textContent = "setting...";
    fetch("rate", { method: "POST", headers: { "Content-Type": "application/json" },
                    body: JSON.stringify({ rate: v }) })
      .then(function (r) { return r.json(); })
      .then(function (res) {
        out.textContent = res.ok ? "rate set to " + res.rate + " req/s" : "refused: " + res.message;
      })
      .catch(function (e) { out.textContent = "failed: " + e; });
  });

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (k) {
      var u = charts[k];
      u.setSize({ width: width(u.root.parentNode), height: 260 });
    });
  });

  build();
  poll();
})();
