"""The ``app-config.js`` we give OHIF: our DICOMweb on the same origin, and the user's bearer token on every request.

How the token reaches OHIF (checked against the bundled code of the pinned version): the DICOMweb data source
and the image loader ask ``userAuthenticationService.getAuthorizationHeader()`` before each request (QIDO,
metadata, frames, thumbnails, bulk data); ``requestOptions.auth`` is not read by that data source. OHIF calls
``window.config`` with its ``servicesManager`` when it is a function, and calls the data source's
``onConfiguration`` each time the source is initialised (study list and viewer route, before any request), so
that hook installs a ``getAuthorizationHeader`` reading the token the login page put in sessionStorage. A 401
(expired token) and OHIF's own "unauthenticated" call send the user back to the login page, which returns to
the same viewer URL afterwards.

Opened from the web pages (``/ui/viewer/{study}``, :mod:`pacs.viewer.handoff`), the hand-off page also leaves the
user's language, the page session's CSRF token and ``origin=pages`` in sessionStorage: the viewer then speaks the
user's language (OHIF's i18next reads the ``i18next`` cookie, then localStorage ``i18nextLng``, before the
browser's language; both are set here before OHIF starts), its sign-out button also ends the page session
(``POST /logout``) and an expired token sends the user through the pages' sign-in and back to the same study.

Settings checked against the bundled code of the pinned version: ``investigationalUseDialog.option = 'never'``
(no "investigational use" banner), the ``ohif.tours`` customization set to ``[]`` (no guided tour: the
Onboarding component starts none), ``viewportOverlay.topLeft`` replaced (customizations given here are global
ones, which win over a mode's) to lead with the patient's name and ID, and ``whiteLabeling.
createLogoComponentFn`` (the header's logo slot) drawing the archive's name and a sign-out button, since OHIF's
own menu offers sign-out only with its OIDC client.
"""

from __future__ import annotations

import json

from pacs.i18n import LANGUAGES, gettext
from pacs.viewer import (
    BASE_PATH,
    CSRF_STORAGE_KEY,
    DICOMWEB_ROOT,
    EXPIRY_STORAGE_KEY,
    LANG_STORAGE_KEY,
    OHIF_VERSION,
    ORIGIN_STORAGE_KEY,
    TOKEN_STORAGE_KEY,
    WADO_URI_ROOT,
)

HANDOFF_PATH = "/ui/viewer"  # the web pages' hand-off (viewer_api.ui.front_pages): sign in again, come back
PAGES_SIGN_IN = "/login"
PAGES_SIGN_OUT = "/logout"
LABELS = {"brand": "Filmless PACS", "signOut": "Sign out", "patientName": "Patient name",
          "patientId": "Patient ID"}

_TEMPLATE = """\
/* OHIF configuration written by `pacs viewer install-ohif` for @ohif/app __VERSION__ (running the command
 * again rewrites it). DICOMweb is this server's __DICOMWEB__; the token comes from __BASE__login.html. */
(function () {
  'use strict';
  var SETTINGS = __SETTINGS__;
  var origin = window.location.origin;
  var storage = window.sessionStorage;

  // The user's language (left by the pages' hand-off), for OHIF's i18next: its cookie, then localStorage.
  var language = storage.getItem(SETTINGS.langKey);
  if (language && /^[a-zA-Z-]{2,8}$/.test(language)) {
    document.cookie = 'i18next=' + language + '; path=/; SameSite=Strict';
    try {
      window.localStorage.setItem('i18nextLng', language);
    } catch (ignored) { /* storage disabled: OHIF falls back to the browser's language */ }
  }
  var labels = SETTINGS.labels[(language || window.navigator.language || '').slice(0, 2).toLowerCase()] ||
    SETTINGS.labels.en;

  function currentToken() {
    var token = window.sessionStorage.getItem(SETTINGS.tokenKey);
    var expires = Number(window.sessionStorage.getItem(SETTINGS.expiryKey) || 0);
    if (!token || (expires && Date.now() >= expires)) {
      return null;
    }
    return token;
  }

  function fromPages() {
    return storage.getItem(SETTINGS.originKey) === 'pages';
  }

  function forget() {
    [SETTINGS.tokenKey, SETTINGS.expiryKey, SETTINGS.csrfKey, SETTINGS.originKey].forEach(function (key) {
      storage.removeItem(key);
    });
  }

  function toLogin() {
    var pages = fromPages();
    forget();
    var next = encodeURIComponent(window.location.pathname + window.location.search);
    window.location.replace(pages ? SETTINGS.handoff + '?next=' + next : SETTINGS.base + 'login.html?next=' + next);
  }

  // The header's sign-out button: forget the token; opened from the pages, also end the page session.
  function signOut(event) {
    if (event) {
      event.preventDefault();
      event.stopPropagation();  // the logo slot's container opens the study list on a click
    }
    var csrf = storage.getItem(SETTINGS.csrfKey);
    var pages = fromPages();
    forget();
    if (!pages || !csrf) {
      window.location.replace(SETTINGS.base + 'login.html?logout');
      return;
    }
    window.fetch(SETTINGS.signOut, { method: 'POST', credentials: 'same-origin', redirect: 'manual',
                                     headers: { 'X-CSRF-Token': csrf } })
      .catch(function () { return null; })
      .then(function () { window.location.replace(SETTINGS.signIn); });
  }

  function logo(React) {
    var h = React.createElement;
    return h('span', { className: 'flex items-center gap-3' },
      h('span', { className: 'text-primary text-lg font-semibold whitespace-nowrap' }, labels.brand),
      h('button', { type: 'button', id: 'pacs-sign-out', onClick: signOut,
                    className: 'text-primary rounded border border-current px-2 py-0.5 text-sm hover:opacity-80' },
        labels.signOut));
  }

  function overlayItem(id, title, content) {
    return {
      id: id, inheritsFrom: 'ohif.overlayItem', label: '', title: title,
      condition: function (props) { return !!(props.referenceInstance && content(props)); },
      contentF: content,
    };
  }

  // The viewport's top-left corner: who this is first (name and ID), then OHIF's own date and series.
  var overlayTopLeft = [
    overlayItem('PatientName', labels.patientName, function (props) {
      var name = props.referenceInstance && props.referenceInstance.PatientName;
      return name && props.formatters && props.formatters.formatPN ? props.formatters.formatPN(name) : name;
    }),
    overlayItem('PatientID', labels.patientId, function (props) {
      return props.referenceInstance && props.referenceInstance.PatientID;
    }),
    overlayItem('StudyDate', 'Study date', function (props) {
      var value = props.referenceInstance && props.referenceInstance.StudyDate;
      return value && props.formatters && props.formatters.formatDate ? props.formatters.formatDate(value) : value;
    }),
    overlayItem('SeriesDescription', 'Series description', function (props) {
      return props.referenceInstance && props.referenceInstance.SeriesDescription;
    }),
  ];

  function authorizationHeader() {
    var token = currentToken();
    return token ? { Authorization: 'Bearer ' + token } : {};
  }

  // Bulk data URIs of our metadata are relative to the DICOMweb root ("studies/…"); OHIF resolves relative
  // ones against the study or series, so make them absolute first.
  function absoluteBulkDataURI(uri) {
    return uri && uri.indexOf('studies/') === 0 ? origin + SETTINGS.dicomweb + '/' + uri : uri;
  }

  window.config = function (context) {
    if (!currentToken()) {
      toLogin();
      return new Promise(function () {});  // never resolves: OHIF does not start while the login page loads
    }
    var servicesManager = context.servicesManager;

    function installAuthorization(configuration) {
      servicesManager.services.userAuthenticationService.setServiceImplementation({
        getAuthorizationHeader: authorizationHeader,
        handleUnauthenticated: toLogin,
      });
      return configuration;
    }

    return {
      routerBasename: SETTINGS.base.replace(/\\/$/, ''),
      extensions: [],
      modes: [],
      customizationService: {
        'ohif.tours': { $set: [] },
        'viewportOverlay.topLeft': { $set: overlayTopLeft },
      },
      investigationalUseDialog: { option: 'never' },
      whiteLabeling: { createLogoComponentFn: logo },
      showStudyList: true,
      maxNumberOfWebWorkers: 3,
      showWarningMessageForCrossOrigin: false,
      showCPUFallbackMessage: true,
      showLoadingIndicator: true,
      strictZSpacingForVolumeViewport: true,
      groupEnabledModesFirst: true,
      maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
      showErrorDetails: 'always',  // a viewer error's details, for the user's report to support
      defaultDataSourceName: 'pacs',
      dataSources: [
        {
          namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
          sourceName: 'pacs',
          configuration: {
            friendlyName: 'PACS',
            name: 'pacs',
            qidoRoot: origin + SETTINGS.dicomweb,
            wadoRoot: origin + SETTINGS.dicomweb,
            wadoUriRoot: origin + SETTINGS.wadoUri,
            qidoSupportsIncludeField: true,
            supportsFuzzyMatching: true,
            supportsWildcard: true,
            imageRendering: 'wadors',
            thumbnailRendering: 'thumbnail',  // our pre-rendered JPEG (workers), fetched with the token
            thumbnailRequestStrategy: 'fetch',
            enableStudyLazyLoad: true,
            staticWado: false,
            omitQuotationForMultipartRequest: true,
            bulkDataURI: { enabled: true, transform: absoluteBulkDataURI },
            // Frames whole (XHR), not streamed: our frames come whole in their stored syntax (nothing
            // progressive to show early), and with streaming Chrome reports about a third of 3.13.2's frame
            // requests as aborted although their bodies were read to the end.
            stackRetrieveOptions: { retrieveOptions: { single: { streaming: false } } },
            onConfiguration: installAuthorization,
          },
        },
      ],
      httpErrorHandler: function (error) {
        if (error && error.status === 401) {
          toLogin();
          return;
        }
        console.warn('DICOMweb request failed', error && error.status);
      },
    };
  };
})();
"""


def render_app_config(base: str = BASE_PATH, dicomweb_root: str = DICOMWEB_ROOT,
                      wado_uri_root: str = WADO_URI_ROOT) -> str:
    """The text of app-config.js (the values are written as JSON, never spliced into code)."""
    settings = {"base": base, "dicomweb": dicomweb_root, "wadoUri": wado_uri_root,
                "tokenKey": TOKEN_STORAGE_KEY, "expiryKey": EXPIRY_STORAGE_KEY, "langKey": LANG_STORAGE_KEY,
                "csrfKey": CSRF_STORAGE_KEY, "originKey": ORIGIN_STORAGE_KEY, "handoff": HANDOFF_PATH,
                "signIn": PAGES_SIGN_IN, "signOut": PAGES_SIGN_OUT,
                "labels": {lang: {key: gettext(lang, text) for key, text in LABELS.items()} for lang in LANGUAGES}}
    return (_TEMPLATE.replace("__SETTINGS__", json.dumps(settings)).replace("__VERSION__", OHIF_VERSION)
            .replace("__DICOMWEB__", dicomweb_root).replace("__BASE__", base))
