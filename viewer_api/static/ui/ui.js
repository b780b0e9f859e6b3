/* Shared behaviour of the web pages (viewer_api.ui); loaded by every page, no inline scripts (CSP).
 * - forms or buttons with data-confirm="question" ask before sending;
 * - window.pacsUi.fetchJSON(url, options): same-origin fetch with the page's CSRF token (X-CSRF-Token, from
 *   <meta name="csrf-token">), JSON in and out; a 401 (session ended) reloads the page, which then goes to sign-in.
 */
(function () {
  "use strict";

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function fetchJSON(url, options) {
    var opts = options || {};
    var headers = Object.assign({ "Accept": "application/json", "X-CSRF-Token": csrfToken() }, opts.headers || {});
    var init = Object.assign({}, opts, { headers: headers, credentials: "same-origin" });
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.json);
      delete init.json;
    }
    return fetch(url, init).then(function (response) {
      if (response.status === 401) {
        window.location.reload();
        return Promise.reject(new Error("session ended"));
      }
      return response;
    });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target.closest("[data-confirm]") : null;
    if (target && target.tagName !== "FORM" && !window.confirm(target.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });

  window.pacsUi = { csrfToken: csrfToken, fetchJSON: fetchJSON };
})();
