"""The web pages of the archive (issue 16): server-rendered HTML in Vietnamese and English for the people who use it.

:mod:`viewer_api.ui.core` is what every page is built on (the session cookie, CSRF, rendering, redirects with a
message); :mod:`viewer_api.ui.router` gathers the pages of each area (sign-in, studies, reading, technologist,
administration, front door). The pages call the same ``pacs`` services as the JSON API, with the same roles,
scopes and audit.
"""
