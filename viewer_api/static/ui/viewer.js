/* The hand-off from the web pages to the OHIF viewer (viewer_api/ui/front_pages.py).
 * Asks POST /ui/viewer-token (the page session's cookie + the CSRF token of <meta name="csrf-token">) for the
 * session's token, keeps it where OHIF's app-config.js reads it (sessionStorage of this tab), with the user's
 * language and the CSRF token for the viewer's sign-out button, then replaces this page with the viewer. */
(function () {
  'use strict';
  var box = document.getElementById('viewer-handoff');
  if (!box) {
    return;
  }
  var data = box.dataset;
  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.getAttribute('content') : '';

  function failed() {
    var status = document.getElementById('handoff-status');
    var error = document.getElementById('handoff-error');
    if (status) {
      status.hidden = true;
    }
    if (error) {
      error.hidden = false;
    }
  }

  window.fetch(data.tokenUrl, {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json', 'Accept': 'application/json', 'X-CSRF-Token': csrf },
    body: JSON.stringify({ study: data.study || '' }),
  }).then(function (response) {
    if (response.status === 401) {  // the session ended meanwhile: sign in again, then come back here
      window.location.replace('/login?next=' + encodeURIComponent(window.location.pathname + window.location.search));
      return null;
    }
    if (!response.ok) {
      throw new Error('hand-off refused: ' + response.status);
    }
    return response.json();
  }).then(function (answer) {
    if (!answer) {
      return;
    }
    var storage = window.sessionStorage;
    storage.setItem(data.keyToken, answer.token);
    storage.setItem(data.keyExpires, String(answer.expires || 0));
    storage.setItem(data.keyLang, data.ohifLang);
    storage.setItem(data.keyCsrf, csrf);
    storage.setItem(data.keyOrigin, 'pages');
    window.location.replace(data.target);
  }).catch(failed);
}());
