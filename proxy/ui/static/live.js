// Live updates for the inbox (the pages work without it): reload when what the page shows
// changes (server-sent events), and count the time left down every second.
(function () {
  "use strict";
  var source = document.body.getAttribute("data-events");
  if (source && window.EventSource) {
    var events = new EventSource(source);
    events.addEventListener("changed", function () {
      var reason = document.querySelector("textarea[name=reason]");
      if (reason && reason.value) {
        var note = document.getElementById("changed");
        if (note) note.hidden = false; // never throw away a reason being written
      } else {
        window.location.reload();
      }
    });
  }
  // The grant button says what it will do: "Approve this and the next 5 like it for 10 minutes".
  var grant = document.getElementById("approve-grant");
  var uses = document.getElementById("grant-uses");
  var time = document.getElementById("grant-time");
  if (grant && uses && time) {
    var unit = time.name === "grant_seconds" ? "seconds" : "minutes";
    var label = function () {
      grant.textContent = "Approve this and the next " + (uses.value || "N") + " like it for " +
        (time.value || "T") + " " + unit;
    };
    uses.addEventListener("input", label);
    time.addEventListener("input", label);
    label();
  }
  function pad(n) { return n < 10 ? "0" + n : "" + n; }
  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      var left = Math.floor(Number(el.getAttribute("data-expires")) - now);
      if (left <= 0) { el.textContent = "expired"; return; }
      var h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      el.textContent = (h ? h + ":" + pad(m) : m) + ":" + pad(s) + " left";
    });
  }
  tick();
  window.setInterval(tick, 1000);
})();
