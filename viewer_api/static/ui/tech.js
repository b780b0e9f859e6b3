/* The technologist's pages: worklist auto-refresh, send progress, the upload drop zone. No framework; the CSRF
   token comes from <meta name="csrf-token"> (ui/base.html). Every text shown comes from the page (translated). */
(function () {
  "use strict";

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  /* -- worklist: the table is re-rendered by the server every 30 s ---------------------------------------- */
  var table = document.getElementById("worklist-table");
  if (table && table.dataset.refresh) {
    var updated = document.getElementById("worklist-updated");
    var refresh = function () {
      if (document.hidden) { return; }
      fetch(table.dataset.refresh, {credentials: "same-origin", headers: {"Accept": "text/html"}})
        .then(function (response) {
          if (response.status === 401 || response.redirected) { window.location.reload(); return null; }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html === null || html === undefined) { return; }
          var focused = document.activeElement && table.contains(document.activeElement);
          if (focused) { return; }  /* never pull the table from under the keyboard */
          table.innerHTML = html;
          if (updated) {
            updated.textContent = table.dataset.updatedLabel + " " + new Date().toLocaleTimeString();
          }
        })
        .catch(function () { /* offline for a moment: the next round tries again */ });
    };
    window.setInterval(refresh, 30000);
  }

  /* -- manage: progress of a send ------------------------------------------------------------------------- */
  var progress = document.getElementById("send-progress");
  if (progress && progress.dataset.progress) {
    var rounds = 0;
    var poll = function () {
      rounds += 1;
      fetch(progress.dataset.progress, {credentials: "same-origin", headers: {"Accept": "application/json"}})
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (body) {
          if (!body) { return; }
          progress.textContent = body.text;
          if (!body.done && rounds < 150) { window.setTimeout(poll, 2000); }
        })
        .catch(function () { if (rounds < 150) { window.setTimeout(poll, 5000); } });
    };
    poll();
  }

  /* -- upload: a drop zone that is also the labelled file input -------------------------------------------- */
  var form = document.getElementById("upload-form");
  if (form) {
    var input = document.getElementById("upload-files");
    var zone = document.getElementById("dropzone");
    var status = document.getElementById("upload-status");
    var results = document.getElementById("upload-results");
    var body = results.querySelector("tbody");

    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("dragging"); });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
    });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        send();
      }
    });
    input.addEventListener("change", function () { if (input.files.length) { send(); } });
    form.addEventListener("submit", function (event) { event.preventDefault(); send(); });

    var cell = function (row, text) {
      var td = document.createElement("td");
      td.textContent = text || "";
      row.appendChild(td);
      return td;
    };

    var send = function () {
      if (!input.files.length) { input.focus(); return; }
      var data = new FormData();
      for (var i = 0; i < input.files.length; i += 1) { data.append("files", input.files[i], input.files[i].name); }
      status.textContent = form.dataset.busy;
      fetch(form.action, {method: "POST", body: data, credentials: "same-origin",
                          headers: {"X-CSRF-Token": csrfToken(), "Accept": "application/json"}})
        .then(function (response) { return response.json().then(function (json) { return [response.ok, json]; }); })
        .then(function (pair) {
          var json = pair[1];
          if (!pair[0]) { status.textContent = json.message || form.dataset.failed; return; }
          status.textContent = json.summary;
          while (body.firstChild) { body.removeChild(body.firstChild); }
          json.files.forEach(function (file) {
            var row = document.createElement("tr");
            row.className = "status-" + file.status;
            cell(row, file.file);
            cell(row, file.entry);
            cell(row, file.status_text);
            var study = cell(row, "");
            if (file.study) {
              var link = document.createElement("a");
              link.href = "/ui/studies/" + encodeURIComponent(file.study) + "/completeness";
              link.textContent = body.dataset.studyLabel;
              study.appendChild(link);
            }
            cell(row, file.message);
            body.appendChild(row);
          });
          results.hidden = false;
          input.value = "";
        })
        .catch(function () { status.textContent = form.dataset.failed; });
    };
  }
}());
