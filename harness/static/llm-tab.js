// Injected into Locust's web UI page by harness.webui: while the "LLM" tab is open, show a
// link to the live charts page (Locust's extended tabs can only hold a plain table).
(function () {
  var script = document.currentScript;
  var base = script ? script.src.replace(/llm\/static\/llm-tab\.js.*$/, "") : "./";
  function update() {
    var on = /[?&]tab=llm(&|$)/.test(window.location.search);
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
  update();
  setInterval(update, 400);
})();
