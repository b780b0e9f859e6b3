"""The viewer's sign-in page (``/ohif/login.html``): plain HTML, one script and one stylesheet, no external assets.

It trades a user name and password for a session token at ``POST /api/auth/login``, or checks a pasted API token
with ``GET /api/auth/me``, keeps the token in sessionStorage (gone when the tab closes; never in a URL or a
cookie, so no request carries it that the viewer did not add it to) and then opens the viewer page it was sent
from. ``login.html?logout`` forgets the token.
"""

from __future__ import annotations

import json

from pacs.viewer import BASE_PATH, EXPIRY_STORAGE_KEY, TOKEN_STORAGE_KEY

LOGIN_HTML = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PACS viewer: sign in</title>
<link rel="icon" href="assets/favicon.ico">
<link rel="stylesheet" href="login.css">
</head>
<body>
<main>
  <h1>PACS viewer</h1>
  <form id="password-form" autocomplete="on">
    <label for="username">User name</label>
    <input id="username" name="username" autocomplete="username" required maxlength="64">
    <label for="password">Password</label>
    <input id="password" name="password" type="password" autocomplete="current-password" required maxlength="256">
    <button type="submit" id="sign-in">Sign in</button>
  </form>
  <details>
    <summary>Use an API token instead</summary>
    <form id="token-form" autocomplete="off">
      <label for="token">API token</label>
      <input id="token" name="token" type="password" required>
      <button type="submit" id="use-token">Open the viewer</button>
    </form>
  </details>
  <p id="message" role="alert"></p>
</main>
<script src="login.js"></script>
</body>
</html>
"""

LOGIN_CSS = """\
body { margin: 0; min-height: 100vh; display: flex; align-items: center; justify-content: center;
       background: #090c29; color: #e1e1e1; font: 16px/1.4 system-ui, sans-serif; }
main { width: 20rem; padding: 2rem; background: #151a3a; border-radius: 8px; }
h1 { margin: 0 0 1.5rem; font-size: 1.4rem; color: #5acce6; }
label { display: block; margin: 0.8rem 0 0.3rem; }
input { box-sizing: border-box; width: 100%; padding: 0.5rem; border: 1px solid #3a3f99; border-radius: 4px;
        background: #090c29; color: inherit; font: inherit; }
button { margin-top: 1.2rem; width: 100%; padding: 0.6rem; border: 0; border-radius: 4px; background: #348cfd;
         color: #fff; font: inherit; cursor: pointer; }
button:disabled { opacity: 0.6; cursor: wait; }
details { margin-top: 1.5rem; }
summary { cursor: pointer; color: #5acce6; }
#message { min-height: 1.4em; margin: 1rem 0 0; color: #ff8a8a; }
#message.info { color: #8fe08f; }
"""

_LOGIN_JS = """\
(function () {
  'use strict';
  var SETTINGS = __SETTINGS__;
  var params = new URLSearchParams(window.location.search);
  var message = document.getElementById('message');

  function show(text, info) {
    message.textContent = text;
    message.className = info ? 'info' : '';
  }

  // Only a page of the viewer itself, on this origin: never an open redirect.
  function nextUrl() {
    var next = params.get('next') || '';
    if (next.indexOf(SETTINGS.base) !== 0 || next.indexOf('//') !== -1 || next.indexOf('\\\\') !== -1) {
      return SETTINGS.base;
    }
    return new URL(next, window.location.origin).origin === window.location.origin ? next : SETTINGS.base;
  }

  function forget() {
    window.sessionStorage.removeItem(SETTINGS.tokenKey);
    window.sessionStorage.removeItem(SETTINGS.expiryKey);
  }

  function keepAndOpen(token, expiresIn) {
    forget();
    window.sessionStorage.setItem(SETTINGS.tokenKey, token);
    if (expiresIn > 0) {  // a little early, so a request never leaves with a token about to expire
      window.sessionStorage.setItem(SETTINGS.expiryKey, String(Date.now() + Math.max(expiresIn - 30, 1) * 1000));
    }
    window.location.replace(nextUrl());
  }

  function explain(response, body) {
    if (response.status === 429) {
      var wait = response.headers.get('Retry-After');
      return 'Too many attempts; try again' + (wait ? ' in ' + wait + ' s.' : ' later.');
    }
    return (body && body.message) || ('The server answered ' + response.status + '.');
  }

  function readJson(response) {
    return response.json().catch(function () { return null; }).then(function (body) {
      return { response: response, body: body };
    });
  }

  function busy(form, on) {
    Array.prototype.forEach.call(form.querySelectorAll('button, input'), function (el) { el.disabled = on; });
  }

  if (params.has('logout')) {
    forget();
    show('Signed out.', true);
  }

  document.getElementById('password-form').addEventListener('submit', function (event) {
    event.preventDefault();
    var form = event.target;
    var credentials = {
      username: document.getElementById('username').value.trim(),
      password: document.getElementById('password').value,
    };
    busy(form, true);
    show('');
    fetch(SETTINGS.login, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify(credentials),
      credentials: 'omit',
    }).then(readJson).then(function (result) {
      if (result.response.ok && result.body && result.body.access_token) {
        keepAndOpen(result.body.access_token, Number(result.body.expires_in) || 0);
        return;
      }
      busy(form, false);
      show(result.response.status === 401 ? 'Wrong user name or password.' : explain(result.response, result.body));
    }).catch(function () {
      busy(form, false);
      show('The server cannot be reached.');
    });
  });

  document.getElementById('token-form').addEventListener('submit', function (event) {
    event.preventDefault();
    var form = event.target;
    var token = document.getElementById('token').value.trim();
    busy(form, true);
    show('');
    fetch(SETTINGS.me, { headers: { Authorization: 'Bearer ' + token, Accept: 'application/json' },
                         credentials: 'omit' })
      .then(readJson).then(function (result) {
        if (result.response.ok) {
          keepAndOpen(token, 0);
          return;
        }
        busy(form, false);
        show(result.response.status === 401 ? 'This token is not valid (wrong, expired or revoked).'
          : explain(result.response, result.body));
      }).catch(function () {
        busy(form, false);
        show('The server cannot be reached.');
      });
  });
})();
"""


def login_files(base: str = BASE_PATH) -> dict[str, str]:
    """File name -> text of the sign-in page's three files."""
    settings = {"base": base, "login": "/api/auth/login", "me": "/api/auth/me", "tokenKey": TOKEN_STORAGE_KEY,
                "expiryKey": EXPIRY_STORAGE_KEY}
    return {"login.html": LOGIN_HTML, "login.css": LOGIN_CSS,
            "login.js": _LOGIN_JS.replace("__SETTINGS__", json.dumps(settings))}
