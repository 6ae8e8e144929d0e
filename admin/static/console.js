/* The admin console's JavaScript: hourly charts (hand-drawn SVG), the audit chain check,
   the history upload with its live progress bar, confirmations on force actions.
   Calls go to /admin/api with the console cookie and the CSRF token in X-CSRF-Token. */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  var i18n = JSON.parse(document.getElementById("i18n").textContent || "{}");

  function t(key) { return i18n[key] || key; }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function api(method, url, body) {
    var init = { method: method, credentials: "same-origin",
                 headers: { "X-CSRF-Token": csrf, "Accept": "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) throw new Error(data.detail || r.statusText);
        return data;
      });
    });
  }

  /* ---- charts: one bar per hour, the last 24 hours -------------------------------- */
  function drawChart(box, hours, values, color) {
    var W = 360, H = 150, left = 30, bottom = 20, top = 10;
    var max = Math.max(1, Math.max.apply(null, values));
    var plotW = W - left - 6, plotH = H - top - bottom, bar = plotW / values.length;
    var chart = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "class": "bars",
                             "aria-label": box.dataset.series });
    var ticks = max >= 4 ? [0, Math.round(max / 2), max] : [0, max];
    ticks.forEach(function (v) {
      var y = top + plotH - v / max * plotH;
      chart.appendChild(svg("line", { x1: left, x2: W - 6, y1: y, y2: y, "class": "grid" }));
      chart.appendChild(svg("text", { x: left - 4, y: y + 4, "text-anchor": "end",
                                      "class": "axis" }, String(v)));
    });
    values.forEach(function (v, i) {
      var h = v / max * plotH, x = left + i * bar + 1;
      var rect = svg("rect", { x: x, y: top + plotH - h, width: Math.max(bar - 2, 1),
                               height: h, fill: color, "data-value": v });
      rect.appendChild(svg("title", {}, hours[i].slice(11, 16) + " UTC: " + v));
      chart.appendChild(rect);
      if (i % 6 === 0 || i === values.length - 1) {
        chart.appendChild(svg("text", { x: x + bar / 2, y: H - 5, "text-anchor": "middle",
                                        "class": "axis" }, hours[i].slice(11, 13) + "h"));
      }
    });
    box.appendChild(chart);
    box.appendChild(el("div", { "class": "total" }, "Σ " + values.reduce(function (a, b) {
      return a + b; }, 0)));
  }

  function drawCharts() {
    var data = document.getElementById("hourly-data");
    if (!data) return;
    var hourly = JSON.parse(data.textContent);
    document.querySelectorAll(".chart[data-series]").forEach(function (box) {
      drawChart(box, hourly.hours, hourly[box.dataset.series] || [], box.dataset.color);
    });
  }

  /* ---- audit chain check ------------------------------------------------------------ */
  function wireVerify() {
    var button = document.getElementById("verify-chain");
    if (!button) return;
    var out = document.getElementById("verify-result");
    button.addEventListener("click", function () {
      out.textContent = "…";
      api("GET", button.dataset.url).then(function (r) {
        out.className = "verify " + (r.intact ? "ok" : "bad");
        out.textContent = r.intact
          ? "✔ " + t("chain_intact") + " (" + r.rows_checked + " " + t("rows_checked") + ")"
          : "✘ " + t("chain_broken") + " " + r.first_bad_row_id;
      }).catch(function (e) { out.className = "verify bad"; out.textContent = e.message; });
    });
  }

  /* ---- confirmations ---------------------------------------------------------------- */
  function wireConfirms() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
      });
    });
  }

  /* ---- history upload with a live progress bar --------------------------------------- */
  function setProgress(fraction, text) {
    var pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    var fill = document.getElementById("progress-fill");
    fill.style.width = pct + "%";
    fill.setAttribute("aria-valuenow", String(pct));
    fill.textContent = pct + "%";
    document.getElementById("progress-text").textContent = text;
  }

  function showResult(card, job) {
    var box = document.getElementById("upload-result");
    box.innerHTML = "";
    var summary = el("p", { id: "import-summary", "class": "job-" + job.status });
    summary.appendChild(el("b", {}, t("import_done") + ": " + job.status));
    ["total_rows", "inserted", "duplicates", "invalid"].forEach(function (k) {
      summary.appendChild(document.createTextNode(" · " + t(k) + " " + job[k]));
    });
    summary.appendChild(document.createTextNode(" · "));
    summary.appendChild(el("a", { href: card.dataset.pageUrl.replace("JOB", job.job_id) },
                           job.job_id));
    box.appendChild(summary);
    api("GET", card.dataset.errorsUrl.replace("JOB", job.job_id)).then(function (errors) {
      box.appendChild(el("h3", {}, t("row_errors") + " (" + errors.total + ")"));
      if (!errors.items.length) { box.appendChild(el("p", { id: "no-row-errors" },
                                                     t("no_row_errors"))); return; }
      var table = el("table", { "class": "list", id: "upload-errors" });
      var head = el("tr");
      head.appendChild(el("th", {}, t("line")));
      head.appendChild(el("th", {}, t("error")));
      table.appendChild(head);
      errors.items.forEach(function (e) {
        var row = el("tr");
        row.appendChild(el("td", { "class": "n" }, String(e.line)));
        row.appendChild(el("td", {}, e.error));
        table.appendChild(row);
      });
      box.appendChild(table);
    });
  }

  function follow(card, jobId) {
    api("GET", card.dataset.jobUrl.replace("JOB", jobId)).then(function (job) {
      var text = t("processing") + " " + job.processed + " / " +
                 (job.total_rows === null ? "?" : job.total_rows) + " (" + job.status + ")";
      setProgress(0.1 + 0.9 * job.progress, text);
      if (job.finished) {
        setProgress(1, t("import_done") + " — " + job.status);
        document.getElementById("upload-progress").dataset.done = job.status;
        showResult(card, job);
      } else {
        window.setTimeout(function () { follow(card, jobId); }, 300);
      }
    }).catch(function (e) { document.getElementById("progress-text").textContent = e.message; });
  }

  function wireUpload() {
    var card = document.getElementById("upload-card");
    if (!card) return;
    document.getElementById("upload-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var file = document.getElementById("upload-file").files[0];
      if (!file) return;
      var progress = document.getElementById("upload-progress");
      progress.hidden = false;
      delete progress.dataset.done;
      document.getElementById("upload-result").innerHTML = "";
      setProgress(0, t("uploading"));
      var form = new FormData();
      form.append("file", file);
      var gap = document.getElementById("upload-session-gap");
      if (gap && gap.value) form.append("session_gap", gap.value);
      var grouping = document.getElementById("upload-grouping");
      if (grouping) form.append("grouping", grouping.value);
      var review = document.getElementById("upload-review");
      if (review && !review.disabled) form.append("review", review.checked ? "true" : "false");
      var xhr = new XMLHttpRequest();
      xhr.open("POST", card.dataset.uploadUrl);
      xhr.setRequestHeader("X-CSRF-Token", csrf);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = function (e) {
        if (e.lengthComputable) setProgress(0.1 * e.loaded / e.total, t("uploading"));
      };
      xhr.onload = function () {
        var body = {};
        try { body = JSON.parse(xhr.responseText); } catch (err) { body = {}; }
        if (xhr.status !== 202) {
          document.getElementById("progress-text").textContent = body.detail || xhr.statusText;
          return;
        }
        progress.dataset.jobId = body.job_id;
        follow(card, body.job_id);
      };
      xhr.send(form);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    wireVerify();
    wireConfirms();
    wireUpload();
  });
})();
