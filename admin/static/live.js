/* Live pages: the transfer queue and the slot page follow the console's event stream
   (/admin/api/events/stream, Server-Sent Events with the console cookie). When an event
   concerns the page, the page's live regions are fetched again once and swapped in place
   (the server renders them, in the page's language): no reload, no polling loop.
   The browser's EventSource reconnects by itself with the last event id it saw. */
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource || !window.fetch || !window.DOMParser) return;
  var TYPES = ["session.activated", "session.queued", "session.paused", "session.resumed",
    "session.transferred", "session.completed", "session.cancelled", "session.timeout",
    "session.handed_back", "transfer.offered", "transfer.accepted", "transfer.expired",
    "transfer.cancelled", "transfer.completed", "transfer.reassigned",
    "transfer.first_response_overdue"];
  var regions = (live.getAttribute("data-regions") || "").split(/\s+/).filter(Boolean);
  var account = live.getAttribute("data-account");
  var shop = live.getAttribute("data-shop");
  var status = live.querySelector(".live-status");
  var timer = null, busy = false, again = false;

  function show(state) {
    live.setAttribute("data-state", state);
    if (status) status.textContent = live.getAttribute("data-text-" + state) || state;
  }

  function concerns(type, event) {
    if (account !== null) {  // a slot page: its own slot's sessions only
      return event.account_id === account && String(event.shop_id) === shop;
    }
    return type.indexOf("transfer.") === 0 || type === "session.transferred" ||
      type === "session.completed" || type === "session.cancelled" ||
      type === "session.timeout" || type === "session.handed_back";
  }

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin",
                                  headers: { "Accept": "text/html" } })
      .then(function (r) { if (!r.ok) throw new Error(r.statusText); return r.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        regions.forEach(function (id) {
          var now = document.getElementById(id), next = fresh.getElementById(id);
          if (now && next) now.replaceWith(document.importNode(next, true));
        });
        live.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next event refreshes again */ })
      .then(function () {
        busy = false;
        if (again) { again = false; schedule(); }
      });
  }

  function schedule() {  // one fetch for a burst of events
    if (timer === null) timer = window.setTimeout(function () { timer = null; refresh(); }, 150);
  }

  var source = null, connected = false;
  function connect() {
    source = new EventSource(live.getAttribute("data-stream"), { withCredentials: true });
    source.onopen = function () {
      show("live");
      if (connected) schedule();  // back after a break: what changed meanwhile
      connected = true;
    };
    source.onerror = function () {
      show("reconnecting");
      // EventSource retries a dropped stream by itself, but not a refused one (a 503 when
      // the server is full, a restart): open a new one a little later
      if (source.readyState === EventSource.CLOSED) window.setTimeout(connect, 5000);
    };
    TYPES.forEach(function (type) {
      source.addEventListener(type, function (message) {
        var event;
        try { event = JSON.parse(message.data); } catch (e) { return; }
        if (concerns(type, event)) schedule();
      });
    });
  }
  show("connecting");
  connect();
  window.addEventListener("pagehide", function () { if (source) source.close(); });
})();
