// Injected into Locust's web UI page by harness.webui. While the "LLM" tab is open: a link to
// the live charts page (Locust's extended tabs hold only a plain table), and below the table a
// panel with each SLO's live value and verdict and what each dash in the table means. The
// verdicts come from /llm/stats (harness.slo judges them); this script only shows them.
(function () {
  var script = document.currentScript;
  var base = script ? script.src.replace(/llm\/static\/llm-tab\.js.*$/, "") : "./";
  var POLL_MS = 2000;
  var last = null;          // the latest /llm/stats answer
  var polling = false;

  function onTab() { return /[?&]tab=llm(&|$)/.test(window.location.search); }

  function link(on) {
    var el = document.getElementById("llm-charts-link");
    if (on && !el) {
      el = document.createElement("a");
      el.id = "llm-charts-link";
      el.href = base + "llm/charts";
      el.textContent = "LLM charts and rate control \u2192";
      el.setAttribute("style", "position:fixed;top:76px;right:24px;z-index:2000;" +
        "background:#1976d2;color:#fff;padding:6px 14px;border-radius:4px;" +
        "font:500 14px Roboto,Helvetica,Arial,sans-serif;text-decoration:none;" +
        "box-shadow:0 2px 4px rgba(0,0,0,.3)");
      document.body.appendChild(el);
    }
    if (el) el.style.display = on ? "block" : "none";
  }

  function text(tag, s, cls) {
    var el = document.createElement(tag);
    el.textContent = s;
    if (cls) el.className = cls;
    return el;
  }

  function fmt(v) {
    if (v == null) return "\u2013";
    var n = Number(v);
    return Math.abs(n) >= 100 ? n.toFixed(1) : Number(n.toPrecision(3)).toString();
  }

  // The panel sits right after the LLM table's box; React may re-create that box, so the
  // panel is put back after it whenever it is not there.
  function panel() {
    var th = document.querySelector('th[data-sortkey="ttftP50"]');
    var box = th && th.closest(".MuiTableContainer-root");
    var el = document.getElementById("llm-panel");
    if (!box) return el;
    if (!el) {
      el = document.createElement("div");
      el.id = "llm-panel";
    }
    if (box.nextSibling !== el) box.insertAdjacentElement("afterend", el);
    return el;
  }

  function render(el, st) {
    el.textContent = "";
    el.appendChild(text("h3", "SLOs (live, the run so far)"));
    var slo = st.slo || { checks: [] };
    if (!slo.checks.length) {
      el.appendChild(text("p", "No SLO given: set llm_slo in the start form (e.g. ttft_p99_ms<=500) " +
                                "or --llm-slo on the command line.", "llm-slo-none"));
    } else {
      var t = document.createElement("table");
      t.id = "llm-slo-table";
      var head = document.createElement("tr");
      ["SLO", "now", "verdict"].forEach(function (h) { head.appendChild(text("th", h)); });
      t.appendChild(head);
      slo.checks.forEach(function (c) {
        var tr = document.createElement("tr");
        tr.setAttribute("data-slo", c.slo);
        tr.appendChild(text("td", c.slo));
        tr.appendChild(text("td", fmt(c.value)));
        var measured = c.value != null;
        tr.appendChild(text("td", !measured ? "not measured yet" : c.passed ? "PASS" : "FAIL",
                            !measured ? "unmeasured" : c.passed ? "pass" : "fail"));
        t.appendChild(tr);
      });
      el.appendChild(t);
    }
    if ((st.notes || []).length) {
      el.appendChild(text("h3", "Empty cells (\u2013)"));
      var ul = document.createElement("ul");
      ul.id = "llm-notes";
      st.notes.forEach(function (n) { ul.appendChild(text("li", n)); });
      el.appendChild(ul);
    }
  }

  var seq = 0;             // answers received; each is drawn once
  function poll() {
    if (polling || !onTab()) return;
    polling = true;
    fetch(base + "llm/stats", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (st) { last = st; seq += 1; window.llmStats = st; })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { polling = false; update(); });
  }

  function update() {
    var on = onTab();
    link(on);
    var el = document.getElementById("llm-panel");
    if (!on) {
      if (el) el.style.display = "none";
      return;
    }
    if (!last) poll();       // the tab just opened: its first numbers now, not in 2 s
    el = panel();
    if (!el) return;
    el.style.display = "block";
    if (last && el.getAttribute("data-rendered") !== String(seq)) {
      render(el, last);
      el.setAttribute("data-rendered", String(seq));
    }
  }

  setInterval(update, 400);
  setInterval(poll, POLL_MS);
  update();
  poll();
})();
