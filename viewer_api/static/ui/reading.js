/* The radiologist's pages (viewer_api/ui/reading_pages.py): the reading list refreshes itself; the report editor
   autosaves the draft, inserts templates, confirms signing, has keyboard shortcuts and can show the images in a
   second window that follows the study opened. No framework, no inline script (the pages' CSP forbids it). */
(function () {
  "use strict";

  var VIEWER_WINDOW = "pacs-reading-viewer";
  var VIEWER_FLAG = "pacs.reading.viewerWindow";
  var REFRESH_MS = 15000;
  var AUTOSAVE_MS = 2000;

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function viewerInWindow() {
    try { return window.sessionStorage.getItem(VIEWER_FLAG) === "1"; } catch (e) { return false; }
  }

  function setViewerInWindow(on) {
    try {
      if (on) { window.sessionStorage.setItem(VIEWER_FLAG, "1"); } else { window.sessionStorage.removeItem(VIEWER_FLAG); }
    } catch (e) { /* storage refused: the button still opens the window */ }
  }

  function openViewerWindow(url) {
    /* the same name re-targets the window already open, so it follows the study */
    var opened = window.open(url, VIEWER_WINDOW);
    if (opened) { setViewerInWindow(true); }
    return opened;
  }

  /* -- the reading list ----------------------------------------------------------------------------------- */

  function readingList(table) {
    var body = document.getElementById("reading-rows");
    var status = document.getElementById("reading-status");
    var url = table.getAttribute("data-rows-url");
    var last = body.innerHTML;
    var busy = false;

    function refresh() {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" }, redirect: "manual" })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          if (html.trim() === last.trim()) { return; }
          var focused = document.activeElement;
          var focusedId = focused && body.contains(focused) ? focused.id : "";
          body.innerHTML = html;
          last = body.innerHTML;
          if (focusedId) {
            var again = document.getElementById(focusedId);
            if (again) { again.focus(); }
          }
          var n = body.querySelectorAll("tr[data-study]").length;
          status.textContent = status.getAttribute("data-updated-text").replace("{n}", String(n));
        })
        .catch(function () { /* signed out or offline: the next tick tries again */ })
        .then(function () { busy = false; });
    }

    window.setInterval(refresh, REFRESH_MS);
    document.addEventListener("click", function (event) {
      var link = event.target.closest ? event.target.closest("a[data-viewer-url]") : null;
      if (link && viewerInWindow()) { openViewerWindow(link.getAttribute("data-viewer-url")); }
    });
  }

  /* -- the report editor ------------------------------------------------------------------------------------ */

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function editor(form) {
    var findings = document.getElementById("findings");
    var impression = document.getElementById("impression");
    var language = document.getElementById("report-language");
    var status = document.getElementById("save-status");
    var editable = form.getAttribute("data-editable") === "true";
    var timer = null;
    var saved = { findings: findings.value, impression: impression.value };
    var saving = null;

    function say(text) { status.textContent = text; }

    function save() {
      if (timer) { window.clearTimeout(timer); timer = null; }
      if (!editable) { return Promise.resolve(); }
      var text = { findings: findings.value, impression: impression.value, language: language ? language.value : "" };
      if (text.findings === saved.findings && text.impression === saved.impression) { return Promise.resolve(); }
      if (saving) { return saving.then(save); }
      say(form.getAttribute("data-saving-text"));
      saving = fetch(form.getAttribute("data-autosave-url"), {
        method: "PUT", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrfToken() },
        body: JSON.stringify(text)
      }).then(function (response) {
        return response.json().then(function (answer) {
          if (!response.ok) {
            say(form.getAttribute("data-failed-text").replace("{reason}", answer.message || response.status));
            return;
          }
          saved = { findings: text.findings, impression: text.impression };
          if (language) { language.disabled = true; }
          var now = new Date();
          say(form.getAttribute("data-saved-text").replace("{time}", pad(now.getHours()) + ":" + pad(now.getMinutes())));
        });
      }).catch(function () {
        say(form.getAttribute("data-offline-text"));
      }).then(function () { saving = null; });
      return saving;
    }

    function later() {
      if (timer) { window.clearTimeout(timer); }
      timer = window.setTimeout(save, AUTOSAVE_MS);
    }

    if (editable) {
      findings.addEventListener("input", later);
      impression.addEventListener("input", later);
    }

    /* every button with data-confirm asks first (signing, signing an amendment); the report form waits for an
       autosave in flight (the first one creates the draft: the form must not create a second one) */
    var confirmed = null;
    document.addEventListener("submit", function (event) {
      var button = event.submitter;
      if (button && button.hasAttribute("data-confirm") && confirmed !== button) {
        if (!window.confirm(button.getAttribute("data-confirm"))) {
          event.preventDefault();
          return;
        }
      }
      confirmed = null;
      if (event.target !== form) { return; }
      if (timer) { window.clearTimeout(timer); timer = null; }  /* the form saves the text itself */
      if (saving) {
        event.preventDefault();
        saving.then(function () {
          confirmed = button;
          form.requestSubmit(button);
        });
      }
    });

    var templates = document.getElementById("template-form");
    if (templates) {
      templates.addEventListener("submit", function (event) {
        var choice = document.getElementById("template").selectedOptions[0];
        if (!choice) { return; }
        event.preventDefault();
        var written = findings.value.trim() || impression.value.trim();
        if (written && !window.confirm(templates.getAttribute("data-replace-text"))) { return; }
        findings.value = choice.getAttribute("data-findings");
        impression.value = choice.getAttribute("data-impression");
        if (language && !language.disabled) { language.value = choice.getAttribute("data-language"); }
        findings.focus();
        later();
      });
    }

    document.addEventListener("keydown", function (event) {
      if (!(event.ctrlKey || event.metaKey)) { return; }
      if (event.key === "s" || event.key === "S") {
        event.preventDefault();
        save();
      } else if (event.key === "Enter") {
        var sign = document.getElementById("sign-report");
        if (sign && form.contains(document.activeElement)) {
          event.preventDefault();
          form.requestSubmit(sign);
        } else {
          var amendSign = document.getElementById("amend-sign");
          var amend = document.getElementById("amend-form");
          if (amendSign && amend && amend.contains(document.activeElement)) {
            event.preventDefault();
            amend.requestSubmit(amendSign);
          }
        }
      }
    });
  }

  function viewer() {
    var button = document.getElementById("viewer-window");
    var inline = document.getElementById("viewer-inline");
    var note = document.getElementById("viewer-window-note");
    var frame = document.getElementById("viewer-frame");
    if (!button || !frame) { return; }
    var url = button.getAttribute("data-viewer-url");

    function windowMode(on) {
      frame.hidden = on;
      note.hidden = !on;
      inline.hidden = !on;
      document.getElementById("reading-split").classList.toggle("viewer-outside", on);
      if (on) { frame.setAttribute("src", "about:blank"); } else if (frame.getAttribute("src") !== url) { frame.setAttribute("src", url); }
    }

    button.addEventListener("click", function () {
      if (openViewerWindow(url)) { windowMode(true); }
    });
    inline.addEventListener("click", function () {
      setViewerInWindow(false);
      windowMode(false);
      button.focus();
    });
    if (viewerInWindow()) { windowMode(true); }
  }

  function start() {
    var table = document.getElementById("reading-list");
    if (table) { readingList(table); }
    var form = document.getElementById("report-form");
    if (form) { editor(form); }
    viewer();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
