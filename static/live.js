/* The live event view of /debug and /demo: one row per event, its Outbound calls beneath. */
(function () {
  "use strict";
  var list = document.getElementById("events");
  var byName = document.getElementById("filter-event");
  var byUser = document.getElementById("filter-user");
  var rows = {};

  function text(tag, className, content) {
    var node = document.createElement(tag);
    node.className = className;
    node.textContent = content;
    return node;
  }

  function visible(row) {
    var name = byName ? byName.value.trim() : "";
    var user = byUser ? byUser.value.trim() : "";
    return (!name || (row.dataset.event || "").indexOf(name) >= 0) &&
      (!user || (row.dataset.user || "").indexOf(user) >= 0);
  }

  function refilter() {
    [].forEach.call(list.children, function (row) {
      row.hidden = !visible(row);
    });
  }

  function showEvent(item) {
    var row = document.createElement("li");
    row.className = "event " + item.status;
    row.dataset.event = item.event || item.type || "";
    row.dataset.user = (item.user_id || "") + " " + (item.anonymous_id || "");
    var head = document.createElement("div");
    head.appendChild(text("span", "status", item.status));
    head.appendChild(text("span", "name", item.event || item.type || "(no name)"));
    head.appendChild(text("span", "user", item.user_id || item.anonymous_id || ""));
    head.appendChild(text("time", "at", new Date(item.at * 1000).toLocaleTimeString()));
    row.appendChild(head);
    (item.errors || []).forEach(function (error) {
      row.appendChild(text("div", "error", (error.path || "(the event)") + ": " + error.message));
    });
    if (item.enrichment) {
      row.appendChild(text("pre", "enrichment", JSON.stringify(item.enrichment, null, 1)));
    }
    if (item.message_id) rows[item.message_id] = row;
    row.hidden = !visible(row);
    list.insertBefore(row, list.firstChild);
  }

  function showCall(item) {
    var row = rows[item.message_id];
    if (!row) return;
    var call = text("div", "call " + item.outcome,
      "POST " + item.endpoint + " \u2192 " + item.outcome + (item.detail ? " (" + item.detail + ")" : ""));
    call.appendChild(text("pre", "body", JSON.stringify(item.body)));
    row.appendChild(call);
  }

  var source = new EventSource(list.getAttribute("data-stream"));
  source.onopen = function () {
    list.setAttribute("data-connected", "true");
  };
  source.onmessage = function (message) {
    var item = JSON.parse(message.data);
    if (item.kind === "event") showEvent(item);
    else if (item.kind === "call") showCall(item);
  };
  if (byName) byName.addEventListener("input", refilter);
  if (byUser) byUser.addEventListener("input", refilter);
})();
