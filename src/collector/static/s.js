/* Outbound collector: page views and track() calls, beaconed first-party. ES5, no dependencies. */
(function (window, document) {
  "use strict";
  var tag = document.currentScript;
  if (!tag || (window.outbound && window.outbound.loaded)) return;

  function setting(name) {
    return tag.getAttribute("data-" + name);
  }

  var origin = document.createElement("a");
  origin.href = tag.src;
  var endpoint = setting("endpoint") || origin.protocol + "//" + origin.host + "/e";
  var storage = window.localStorage;
  var anonymousId = storage.getItem("ob_aid");
  if (!anonymousId) {
    anonymousId = uuid();
    storage.setItem("ob_aid", anonymousId);
  }
  var userId = setting("user-id");
  var userHash = setting("user-hash");

  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, function (c) {
      var r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 3) | 8).toString(16);
    });
  }

  function now() {
    return Date.now() / 1000;
  }

  function send(event) {
    event.message_id = uuid();
    event.timestamp = now();
    event.anonymous_id = anonymousId;
    if (userId) {
      event.user_id = userId;
      if (userHash) event.user_hash = userHash;
    }
    event.context = {
      url: location.href,
      path: location.pathname,
      title: document.title,
      referrer: document.referrer,
      locale: navigator.language
    };
    event.sent_at = now();
    var body = JSON.stringify(event);
    if (window.fetch) {
      window.fetch(endpoint, {
        method: "POST",
        body: body,
        keepalive: true,
        headers: { "Content-Type": "text/plain" }
      });
    } else if (navigator.sendBeacon) {
      navigator.sendBeacon(endpoint, body);
    }
  }

  window.outbound = {
    loaded: true,
    track: function (name, properties) {
      send({ type: "track", event: name, properties: properties || {} });
    },
    page: function () {
      send({ type: "page" });
    }
  };
  window.outbound.page();
})(window, document);
