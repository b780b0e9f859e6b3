"""The ``app-config.js`` we give OHIF: our DICOMweb on the same origin, and the user's bearer token on every request.

How the token reaches OHIF (checked against the bundled code of the pinned version): the DICOMweb data source
and the image loader ask ``userAuthenticationService.getAuthorizationHeader()`` before each request (QIDO,
metadata, frames, thumbnails, bulk data); ``requestOptions.auth`` is not read by that data source. OHIF calls
``window.config`` with its ``servicesManager`` when it is a function, and calls the data source's
``onConfiguration`` each time the source is initialised (study list and viewer route, before any request), so
that hook installs a ``getAuthorizationHeader`` reading the token the login page put in sessionStorage. A 401
(expired token) and OHIF's own "unauthenticated" call send the user back to the login page, which returns to
the same viewer URL afterwards.
"""

from __future__ import annotations

import json

from pacs.viewer import (
    BASE_PATH,
    DICOMWEB_ROOT,
    EXPIRY_STORAGE_KEY,
    OHIF_VERSION,
    TOKEN_STORAGE_KEY,
    WADO_URI_ROOT,
)

_TEMPLATE = """\
/* OHIF configuration written by `pacs viewer install-ohif` for @ohif/app __VERSION__ (running the command
 * again rewrites it). DICOMweb is this server's __DICOMWEB__; the token comes from __BASE__login.html. */
(function () {
  'use strict';
  var SETTINGS = __SETTINGS__;
  var origin = window.location.origin;

  function currentToken() {
    var token = window.sessionStorage.getItem(SETTINGS.tokenKey);
    var expires = Number(window.sessionStorage.getItem(SETTINGS.expiryKey) || 0);
    if (!token || (expires && Date.now() >= expires)) {
      return null;
    }
    return token;
  }

  function toLogin() {
    window.sessionStorage.removeItem(SETTINGS.tokenKey);
    window.sessionStorage.removeItem(SETTINGS.expiryKey);
    var next = window.location.pathname + window.location.search;
    window.location.replace(SETTINGS.base + 'login.html?next=' + encodeURIComponent(next));
  }

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
      customizationService: {},
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
                "tokenKey": TOKEN_STORAGE_KEY, "expiryKey": EXPIRY_STORAGE_KEY}
    return (_TEMPLATE.replace("__SETTINGS__", json.dumps(settings)).replace("__VERSION__", OHIF_VERSION)
            .replace("__DICOMWEB__", dicomweb_root).replace("__BASE__", base))
