/* Outbound collector: page views, marked clicks and forms, track/identify/page/reset.
   Hand-written ES5, no dependencies. Configured by its own tag's data-* attributes (README). */
(function (w, d, nav) {
  var tag = d.currentScript;
  var queued = w.outbound;
  if (!tag || (queued && queued.track)) return; // no tag, or loaded already

  var PREFIX = "outbound:";
  var MARK = "data-outbound";
  var BATCH_BYTES = 60000; // under the 64 KiB that keepalive requests may carry
  var OUTBOX_SIZE = 200;
  var link = d.createElement("a");
  link.href = tag.src;
  // Behind a reverse proxy the script may live under a prefix (/c/s.js): so do the events.
  // (split, not slice by length: the minifier would fold the placeholder's length.)
  var parts = link.pathname.split("{{SCRIPT_PATH}}");
  var prefix = parts.length === 2 && !parts[1] ? parts[0] : "";
  var endpoint = setting("endpoint") || link.origin + prefix + "{{EVENT_PATH}}";
  var hashRouting = enabled("hash-routing");
  // The logged-in user: the tag's, else the last identify's, kept until reset.
  var user = setting("user-id") ? [setting("user-id"), setting("user-hash")] : load("user") || [];
  var debug = enabled("debug");
  var said = {}; // what the console was told, so that it is told once
  var anonymousId = load("aid") || uuid();
  var memory = []; // the outbox when localStorage is unavailable
  var flying = {}; // message ids being sent now
  var tried = {}; // message ids this page has tried to send
  var flushTimer, retryTimer, backoff = 0, lastUrl, referrer = d.referrer;
  var replayedAt; // [url, title, time] of a call made before the script loaded
  var hidden; // the page is going away (pagehide), unless it comes back from the bfcache
  save("aid", anonymousId);

  function setting(name) {
    return tag.getAttribute("data-" + name);
  }

  // With data-debug, tell the console why something was not sent, once each; true, so that
  // it can stand in a condition that refuses.
  function say(message) {
    if (debug && !said[message]) console.warn("outbound: " + message);
    return said[message] = 1;
  }

  function enabled(name) {
    var value = setting(name);
    return value !== null && value !== "false";
  }

  function load(key) {
    try {
      return JSON.parse(w.localStorage.getItem(PREFIX + key));
    } catch (e) {} // undefined: as good as nothing stored
  }

  function save(key, value) {
    try {
      w.localStorage.setItem(PREFIX + key, JSON.stringify(value));
    } catch (e) {}
  }

  function uuid() {
    var b = w.crypto.getRandomValues(new Uint8Array(16));
    return [].map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
  }

  // Message ids begin with the time (hex milliseconds), so that the collector's index of
  // recent ids grows at one end rather than everywhere, as with UUIDv7.
  function messageId() {
    return (Date.now() + 0x1000000000000).toString(16).slice(1) + uuid().slice(12);
  }

  // The one place that decides not to send: opt-out, automation, privacy signals.
  function refused() {
    return load("opt_out") ||
      (nav.webdriver && !enabled("allow-automation") &&
        say("webdriver: add data-allow-automation")) ||
      (nav.globalPrivacyControl && setting("respect-gpc") !== "false") ||
      (nav.doNotTrack === "1" && enabled("respect-dnt"));
  }

  // Unacknowledged events live in localStorage so that a reload does not lose them.
  function outbox(events) {
    if (events) save("outbox", memory = events.slice(-OUTBOX_SIZE));
    return load("outbox") || memory;
  }

  function record(type, fields) {
    if (refused()) return;
    var at = replayedAt || [location.href, d.title, Date.now()];
    link.href = at[0];
    fields.type = type;
    fields.message_id = messageId();
    fields.anonymous_id = anonymousId;
    fields.timestamp = at[2] / 1000;
    fields.context = {
      url: at[0],
      path: link.pathname,
      title: at[1],
      referrer: referrer,
      locale: nav.language,
      screen: screen.width + "x" + screen.height
    };
    if (user[0]) {
      fields.user_id = user[0];
      if (user[1]) fields.user_hash = user[1];
    }
    outbox(outbox().concat([fields]));
    flushTimer = flushTimer || setTimeout(flush, 1000);
  }

  // Send what waits, in requests under the keepalive quota. When the page is going away,
  // requests in flight are left to keepalive (a next page must not send them again), what
  // was never tried is beaconed, and what failed before stays for the next page load.
  function flush(leaving) {
    clearTimeout(flushTimer);
    flushTimer = 0;
    var batch = [], size = 0;
    if (leaving) outbox(unless(flying));
    outbox().forEach(function (event) {
      var id = event.message_id, bytes = JSON.stringify(event).length;
      if (flying[id] || (leaving && tried[id])) return;
      if (size + bytes > BATCH_BYTES && batch.length) {
        send(batch, leaving);
        batch = [];
        size = 0;
      }
      batch.push(event);
      size += bytes;
    });
    if (batch.length) send(batch, leaving);
  }

  function send(batch, leaving) {
    var ids = {};
    batch.forEach(function (event) {
      flying[event.message_id] = tried[event.message_id] = ids[event.message_id] = 1;
    });
    var body = JSON.stringify({ batch: batch, sent_at: Date.now() / 1000 });
    if (leaving && nav.sendBeacon(endpoint, body)) return sent(ids);
    fetch(endpoint, { method: "POST", body: body, keepalive: true }).then(function (response) {
      var status = response.status;
      if (status > 499 || status === 429 || status === 408) throw response;
      // Any other answer is final: what was refused would be refused again.
      backoff = 0;
      sent(ids);
      if (debug) response.json().then(function (answer) {
        if (answer.accepted != batch.length) say(status + " " + JSON.stringify(answer));
      });
    })["catch"](function () {
      for (var id in ids) flying[id] = 0;
      // Back in, if hiding took them out; a page going away aborts its own requests, but
      // keepalive still delivers them, so those must not be sent again from the next page.
      if (!hidden) outbox(batch.concat(unless(ids)));
      if (retryTimer) return;
      backoff = Math.min(30000, backoff * 2 || 1000);
      retryTimer = setTimeout(function () {
        retryTimer = 0;
        flush();
      }, backoff);
    });
  }

  function sent(ids) {
    outbox(unless(ids));
  }

  // The outbox without the given message ids (an object of flags).
  function unless(ids) {
    return outbox().filter(function (event) {
      return !ids[event.message_id];
    });
  }

  function page(force) {
    var url = replayedAt ? replayedAt[0] : location.href;
    if (!hashRouting) url = url.split("#")[0];
    if (url === lastUrl && !force) return;
    if (url !== lastUrl) referrer = lastUrl || referrer;
    lastUrl = url;
    record("page", {});
  }

  function properties(element) {
    var result = {};
    [].forEach.call(element.attributes, function (attribute) {
      var name = attribute.name;
      if (name.indexOf(MARK + "-") === 0) result[name.slice(MARK.length + 1)] = attribute.value;
    });
    return result;
  }

  // Generic captures describe the element, never what was typed into it.
  function describe(element) {
    var result = {}, text = element.innerText.replace(/\s+/g, " ").trim();
    var name = element.getAttribute("name");
    if (element.id) result.id = element.id;
    if (name) result.name = name;
    if (text && element.tagName !== "FORM") result.text = text.slice(0, 60);
    return result;
  }

  function capture(element, generic) {
    var name = element.getAttribute(MARK);
    if (!name && !generic) return;
    record("track", { event: name || generic, properties: (name ? properties : describe)(element) });
    flush(); // the page may be about to navigate away: send now, with keepalive
  }

  var api = {
    track: function (event, props) {
      record("track", { event: event, properties: props || {} });
    },
    identify: function (id, traits, hash) {
      save("user", user = [id, hash]);
      record("identify", { traits: traits || {} });
    },
    page: function () {
      page(true);
    },
    reset: function () {
      save("user", user = []);
      save("aid", anonymousId = uuid());
    }
  };

  // The pre-load stub is `outbound(method, ...args)`; the script keeps that calling style.
  function outboundCall(method) {
    var args = [].slice.call(arguments, 1);
    if (api[method]) api[method].apply(null, args);
    else say("unknown command: " + method);
  }
  for (var method in api) outboundCall[method] = api[method];
  w.outbound = outboundCall;

  function navigated() {
    page(false);
  }

  var history = w.history;
  ["pushState", "replaceState"].forEach(function (name) {
    var original = history[name];
    history[name] = function () {
      var result = original.apply(this, arguments);
      navigated();
      return result;
    };
  });
  w.addEventListener("popstate", navigated);
  w.addEventListener("hashchange", navigated); // without hash routing, the same URL
  w.addEventListener("pageshow", function (event) {
    hidden = 0;
    if (event.persisted) page(true); // restored from the back/forward cache
  });
  w.addEventListener("pagehide", function () {
    hidden = 1;
    flush(1);
  });
  d.addEventListener("visibilitychange", function () {
    if (d.hidden) flush(1);
  });
  d.addEventListener("click", function (event) {
    var target = event.target;
    var marked = target.closest("[" + MARK + "]"); // clicks target elements
    if (marked && marked.tagName !== "FORM") capture(marked);
    else if (enabled("track-clicks") && (target = target.closest("button"))) {
      capture(target, "Button clicked");
    }
  }, true);
  d.addEventListener("submit", function (event) {
    capture(event.target, enabled("track-forms") && "Form submitted");
  }, true);

  // Calls made before the script loaded, each with the page it was made on.
  ((queued && queued.q) || []).forEach(function (call) {
    replayedAt = call.slice(1);
    outboundCall.apply(null, call[0]);
  });
  replayedAt = 0;
  if (setting("track-pages") !== "false") {
    if (d.prerendering) d.addEventListener("prerenderingchange", navigated);
    else navigated();
  }
  flush();
})(window, document, navigator);
