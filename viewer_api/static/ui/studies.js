// The study browser: asks every few seconds whether studies matching the page's search have arrived since it was
// shown (GET /ui/studies/updates, a count only) and says so in a polite live region with a link that shows them.
// The share page: copies the link to the clipboard.
(function () {
  "use strict";

  function pollNewStudies(box) {
    var url = box.getAttribute("data-updates-url");
    var since = parseInt(box.getAttribute("data-since") || "0", 10);
    var seconds = Math.max(2, parseInt(box.getAttribute("data-poll-seconds") || "10", 10));
    var banner = document.getElementById("new-studies-banner");
    var count = document.getElementById("new-studies-count");
    var stopped = false;
    var timer = null;

    function ask() {
      if (stopped) { return; }
      var sep = url.indexOf("?") >= 0 ? "&" : "?";
      fetch(url + sep + "since=" + encodeURIComponent(String(since)), {
        credentials: "same-origin", headers: { "Accept": "application/json" }, cache: "no-store"
      }).then(function (response) {
        // signed out or the session expired: stop asking (the next navigation goes to the sign-in page)
        if (!response.ok || response.redirected) { stopped = true; return null; }
        return response.json();
      }).then(function (answer) {
        if (!answer || typeof answer.new !== "number") { return; }
        if (answer.new > 0) {
          count.textContent = String(answer.new);
          banner.hidden = false;
        }
      }).catch(function () { /* the network is down for a moment: ask again next time */ });
    }

    timer = window.setInterval(ask, seconds * 1000);
    window.addEventListener("pagehide", function () { stopped = true; window.clearInterval(timer); });
  }

  function copyButton(button) {
    var input = document.getElementById("share-url");
    button.addEventListener("click", function () {
      input.select();
      var done = function () { button.textContent = button.getAttribute("data-copied") || button.textContent; };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(input.value).then(done, function () { /* the text stays selected */ });
      }
    });
  }

  var box = document.getElementById("new-studies");
  if (box) { pollNewStudies(box); }
  var copy = document.getElementById("copy-share-url");
  if (copy) { copyButton(copy); }
})();
