/* The live views of /debug and /demo: a bounded table of events as they arrive (a row
   opens to the event and its Outbound calls), pause, clear, filters kept in localStorage,
   and a chart of the last minute. No inline script or handler: the pages' CSP allows none. */
(function () {
  "use strict";
  var LIMIT = 500; // rows kept; older ones go, so the page stays small however long it is open
  var SECONDS = 60; // the chart's window
  var STORE = "collector-live:" + location.pathname + ":";

  var table = document.getElementById("events");
  var count = document.getElementById("count");
  var pauseButton = document.getElementById("pause");
  var clearButton = document.getElementById("clear");
  var canvas = document.getElementById("chart");
  var filters = {
    event: document.getElementById("filter-event"),
    user: document.getElementById("filter-user"),
    status: document.getElementById("filter-status")
  };

  var rows = {}; // message id -> the event's <tbody>
  var paused = false;
  var waiting = []; // items that came while paused, shown on resume
  var removed = 0; // rows dropped for the limit since the last clear
  // The name Outbound receives for page views (page_event_name); learned from the first
  // page view's track call, until then the default.
  var pageName = "pageView";
  var pageRows = [];

  function element(tag, className, content) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (content !== undefined) node.textContent = content;
    return node;
  }

  function pad(number, width) {
    return ("000" + number).slice(-width);
  }

  // A Unix time in the viewer's zone, to the millisecond.
  function clock(seconds) {
    var date = new Date(seconds * 1000);
    return pad(date.getHours(), 2) + ":" + pad(date.getMinutes(), 2) + ":" +
      pad(date.getSeconds(), 2) + "." + pad(date.getMilliseconds(), 3);
  }

  function fullTime(seconds) {
    var date = new Date(seconds * 1000);
    return date.toLocaleDateString() + " " + clock(seconds);
  }

  var TIMES = { at: 1, received_at: 1, timestamp: 1, clamped_from: 1, sent_at: 1 };

  // Pretty JSON, with Unix times also written as the viewer's local time.
  function pretty(value) {
    return JSON.stringify(value, function (key, field) {
      if (TIMES[key] && typeof field === "number") return fullTime(field) + " (" + field + ")";
      return field;
    }, 2);
  }

  function label(item) {
    if (item.event) return item.event;
    if (item.type === "page") return pageName;
    return item.type || "(no name)";
  }

  // ---- filters -------------------------------------------------------------------------

  function wanted(row) {
    var name = filters.event ? filters.event.value.trim().toLowerCase() : "";
    var user = filters.user ? filters.user.value.trim() : "";
    var status = filters.status ? filters.status.value : "";
    return (!name || row.getAttribute("data-event").toLowerCase().indexOf(name) >= 0) &&
      (!user || row.getAttribute("data-user").indexOf(user) >= 0) &&
      (!status || row.getAttribute("data-status") === status);
  }

  function refilter() {
    [].forEach.call(table.tBodies, function (row) {
      row.hidden = !wanted(row);
    });
    recount();
  }

  function keepFilter(name) {
    var input = filters[name];
    if (!input) return;
    try {
      var kept = localStorage.getItem(STORE + name);
      if (kept !== null) input.value = kept;
    } catch (e) {}
    input.addEventListener(input.tagName === "SELECT" ? "change" : "input", function () {
      try {
        localStorage.setItem(STORE + name, input.value);
      } catch (e) {}
      refilter();
    });
  }

  function recount() {
    if (!count) return;
    var total = table.tBodies.length, shown = 0;
    [].forEach.call(table.tBodies, function (row) {
      if (!row.hidden) shown += 1;
    });
    var text = total + (total === 1 ? " event" : " events");
    if (shown !== total) text += ", " + shown + " shown";
    if (removed) text += " (the latest " + LIMIT + "; " + removed + " older removed)";
    if (paused) {
      var held = waiting.filter(function (item) { return item.kind === "event"; }).length;
      text += " · paused, " + held + (held === 1 ? " new event" : " new events") + " waiting";
    }
    count.textContent = text;
  }

  // ---- rows ----------------------------------------------------------------------------

  function showEvent(item) {
    var row = element("tbody", "event " + item.status);
    var user = item.user_id || item.anonymous_id || "";
    row.setAttribute("data-event", label(item));
    row.setAttribute("data-user", (item.user_id || "") + " " + (item.anonymous_id || ""));
    row.setAttribute("data-status", item.status);

    var summary = element("tr", "summary");
    summary.tabIndex = 0;
    var time = element("td", "at", clock(item.at));
    time.title = fullTime(item.at);
    summary.appendChild(time);
    var status = element("td");
    status.appendChild(element("span", "status", item.status));
    summary.appendChild(status);
    summary.appendChild(element("td", "name", label(item)));
    var who = element("td", "user", user);
    who.title = user;
    summary.appendChild(who);
    summary.appendChild(element("td", "calls", item.message_id ? "…" : "—"));
    row.appendChild(summary);

    var detail = element("tr", "detail");
    detail.hidden = true;
    var cell = element("td");
    cell.colSpan = 5;
    (item.errors || []).forEach(function (error) {
      cell.appendChild(element("div", "error", (error.path || "(the event)") + ": " + error.message));
    });
    var shown = {};
    for (var key in item) if (key !== "kind") shown[key] = item[key];
    cell.appendChild(element("h3", "", "Event"));
    cell.appendChild(element("pre", "event-json", pretty(shown)));
    detail.appendChild(cell);
    row.appendChild(detail);

    summary.addEventListener("click", function () {
      toggle(row);
    });
    summary.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        toggle(row);
      }
    });

    if (item.message_id) rows[item.message_id] = row;
    if (item.type === "page" && !item.event) pageRows.push(row);
    row.hidden = !wanted(row);
    table.insertBefore(row, table.tBodies[0] || null);
    while (table.tBodies.length > LIMIT) {
      forget(table.tBodies[table.tBodies.length - 1]);
      removed += 1;
    }
  }

  function toggle(row) {
    var open = row.classList.toggle("open");
    row.querySelector(".detail").hidden = !open;
  }

  function forget(row) {
    for (var id in rows) if (rows[id] === row) delete rows[id];
    var index = pageRows.indexOf(row);
    if (index >= 0) pageRows.splice(index, 1);
    row.parentNode.removeChild(row);
  }

  function showCall(item) {
    var row = rows[item.message_id];
    if (!row) return;
    var endpoint = item.endpoint.replace(/^\/v2\//, "");
    if (endpoint === "track" && item.body && row.getAttribute("data-status") !== "rejected" &&
        pageRows.indexOf(row) >= 0 && item.body.event && item.body.event !== pageName) {
      pageName = item.body.event;
      relabelPages();
    }
    var calls = row.querySelector(".calls");
    if (!row.querySelector(".call")) calls.textContent = "";
    var result = item.outcome + (item.status ? " " + item.status : "");
    var tag = element("span", "call " + item.outcome, endpoint + " " + result);
    tag.title = item.detail || "";
    calls.appendChild(tag);

    var cell = row.querySelector(".detail td");
    cell.appendChild(element("h3", "call-head " + item.outcome,
      "POST " + item.endpoint + " \u2192 " + result + (item.detail ? " (" + item.detail + ")" : "")));
    cell.appendChild(element("pre", "call-json", pretty(item.body)));
  }

  function relabelPages() {
    pageRows.forEach(function (row) {
      row.setAttribute("data-event", pageName);
      row.querySelector(".name").textContent = pageName;
    });
    refilter();
  }

  // ---- the chart -----------------------------------------------------------------------

  // Widest first: where lines meet (every accepted event relayed in the same second), each
  // still shows at the edges of the one drawn over it.
  var SERIES = [
    { key: "accepted", color: "#2b8a3e", width: 5 },
    { key: "rejected", color: "#c92a2a", width: 3.5 },
    { key: "relayed", color: "#1864ab", width: 2 }
  ];
  var buckets = {}; // whole second -> counts in that second
  var depth = []; // [second, queue depth] when the stream reports it

  function bucket(seconds) {
    var second = Math.floor(seconds);
    return buckets[second] || (buckets[second] = { accepted: 0, rejected: 0, relayed: 0 });
  }

  function countItem(item) {
    var now = item.at || Date.now() / 1000;
    if (item.kind === "event") {
      bucket(now)[item.status === "rejected" || item.status === "dropped" ? "rejected" : "accepted"] += 1;
    } else if (item.kind === "call" && (item.outcome === "sent" || item.outcome === "dry_run")) {
      bucket(Date.now() / 1000).relayed += 1;
    } else if (item.kind === "queue" && typeof item.depth === "number") {
      depth.push([Math.floor(now), item.depth]);
    }
  }

  function draw() {
    if (!canvas || !canvas.getContext) return;
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== width * ratio) canvas.width = width * ratio;
    if (canvas.height !== height * ratio) canvas.height = height * ratio;
    var context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);

    var now = Math.floor(Date.now() / 1000), first = now - SECONDS + 1;
    for (var second in buckets) if (+second < first - 1) delete buckets[second];
    depth = depth.filter(function (point) { return point[0] >= first; });
    var top = 1, deepest = 1;
    for (var s = first; s <= now; s++) {
      var counts = buckets[s];
      if (counts) top = Math.max(top, counts.accepted, counts.rejected, counts.relayed);
    }
    depth.forEach(function (point) { deepest = Math.max(deepest, point[1]); });

    var left = 34, right = depth.length ? 40 : 8, bottom = 16, plotTop = 6;
    var plotWidth = width - left - right, plotHeight = height - bottom - plotTop;
    function x(second) { return left + (second - first) / (SECONDS - 1) * plotWidth; }
    function y(value, max) { return plotTop + plotHeight - value / max * plotHeight; }

    // Axes and scale: the busiest second of the window, and "60 s ago" to "now".
    context.strokeStyle = "#c5cad3";
    context.lineWidth = 1;
    context.beginPath();
    context.moveTo(left, plotTop);
    context.lineTo(left, plotTop + plotHeight);
    context.lineTo(left + plotWidth, plotTop + plotHeight);
    context.stroke();
    context.fillStyle = "#5c6370";
    context.font = "11px system-ui, sans-serif";
    context.textAlign = "right";
    context.fillText(top + "/s", left - 4, plotTop + 9);
    context.fillText("0", left - 4, plotTop + plotHeight);
    context.textAlign = "left";
    context.fillText(SECONDS + " s ago", left, height - 3);
    context.textAlign = "right";
    context.fillText("now", left + plotWidth, height - 3);

    if (depth.length) {
      context.fillStyle = "#adb5bd55";
      context.beginPath();
      context.moveTo(x(depth[0][0]), y(0, deepest));
      depth.forEach(function (point) { context.lineTo(x(point[0]), y(point[1], deepest)); });
      context.lineTo(x(depth[depth.length - 1][0]), y(0, deepest));
      context.closePath();
      context.fill();
      context.fillStyle = "#5c6370";
      context.textAlign = "left";
      context.fillText(deepest + " queued", left + plotWidth + 4, plotTop + 9);
    }

    SERIES.forEach(function (series) {
      context.lineWidth = series.width;
      context.strokeStyle = series.color;
      context.beginPath();
      for (var s = first; s <= now; s++) {
        var value = buckets[s] ? buckets[s][series.key] : 0;
        if (s === first) context.moveTo(x(s), y(value, top));
        else context.lineTo(x(s), y(value, top));
      }
      context.stroke();
    });
  }

  // ---- the stream ----------------------------------------------------------------------

  function take(item) {
    if (item.kind === "event") showEvent(item);
    else if (item.kind === "call") showCall(item);
  }

  function receive(item) {
    countItem(item); // the chart runs on while the table is paused
    if (paused) {
      waiting.push(item);
      if (waiting.length > LIMIT * 4) waiting.shift();
    } else {
      take(item);
    }
    recount();
  }

  function connect(url) {
    var source = new EventSource(url);
    source.onopen = function () {
      table.setAttribute("data-connected", "true");
    };
    source.onmessage = function (message) {
      receive(JSON.parse(message.data));
    };
  }

  if (pauseButton) {
    pauseButton.addEventListener("click", function () {
      paused = !paused;
      pauseButton.textContent = paused ? "Resume" : "Pause";
      pauseButton.setAttribute("aria-pressed", String(paused));
      if (!paused) {
        waiting.forEach(take);
        waiting = [];
      }
      recount();
    });
  }
  if (clearButton) {
    clearButton.addEventListener("click", function () {
      while (table.tBodies.length) forget(table.tBodies[0]);
      waiting = [];
      removed = 0;
      recount();
    });
  }
  keepFilter("event");
  keepFilter("user");
  keepFilter("status");
  recount();
  draw();
  setInterval(draw, 1000);

  // The demo's stream carries only the viewer's own events: it needs the anonymous id the
  // collector's script keeps, which exists once the script has run.
  var stream = table.getAttribute("data-stream");
  if (table.hasAttribute("data-own-events")) {
    (function wait() {
      var aid = null;
      try {
        aid = JSON.parse(localStorage.getItem("outbound:aid") || "null");
      } catch (e) {}
      if (!aid) return setTimeout(wait, 100);
      connect(stream + "?aid=" + encodeURIComponent(aid));
    })();
  } else {
    connect(stream);
  }

  // ---- the demo's buttons (no inline handlers) ------------------------------------------

  [].forEach.call(document.querySelectorAll("[data-demo-push]"), function (link) {
    link.addEventListener("click", function (event) {
      event.preventDefault();
      history.pushState({}, "", link.getAttribute("data-demo-push"));
    });
  });
  [].forEach.call(document.querySelectorAll("form[data-demo-stay]"), function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
    });
  });
  var custom = document.getElementById("custom");
  if (custom) {
    custom.addEventListener("click", function () {
      window.outbound("track", "demoCustom", { clicked_at: new Date().toISOString() });
    });
  }
})();
