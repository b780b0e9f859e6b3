// Hands a share link's viewer session to the OHIF viewer (pacs.viewer): the token goes into sessionStorage
// under the keys the viewer reads (as its sign-in page does), then the viewer opens the one study.
(function () {
  'use strict';
  var el = document.getElementById('handoff');
  if (!el) { return; }
  var d = el.dataset;
  var next = d.next || '';
  if (next.indexOf('/ohif/') !== 0 || next.indexOf('//') !== -1) { return; }  // only the viewer, this origin
  window.sessionStorage.removeItem(d.tokenKey);
  window.sessionStorage.removeItem(d.expiryKey);
  window.sessionStorage.setItem(d.tokenKey, d.token);
  var ttl = parseInt(d.expiresIn, 10);
  if (ttl > 0) {  // a little early, so a request never leaves with a token about to expire
    window.sessionStorage.setItem(d.expiryKey, String(Date.now() + Math.max(ttl - 30, 1) * 1000));
  }
  window.location.replace(next);
}());
