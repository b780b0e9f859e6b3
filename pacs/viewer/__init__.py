"""The OHIF viewer: fetched from npm, adapted to be served under ``/ohif/`` and wired to our DICOMweb with a token.

``pacs viewer install-ohif`` runs :func:`pacs.viewer.install.install_ohif`; ``viewer_api/ohif.py`` serves the
result with :mod:`pacs.viewer.site`. The viewer's files hold no patient data; every data request it makes goes to
the token-protected DICOMweb routes with ``Authorization: Bearer`` (see :mod:`pacs.viewer.app_config`).
"""

from __future__ import annotations

from pacs.errors import PacsError

OHIF_PACKAGE = "@ohif/app"
# The one version whose bundle layout the install step knows (public path, index.html); a new version needs
# its own check of pacs.viewer.rebase and of the browser test before the pin moves.
OHIF_VERSION = "3.13.2"
# The npm registry's integrity of that tarball: a --from-tarball file or an npm mirror must give the same bytes.
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="

BASE_PATH = "/ohif/"  # where viewer_api serves the viewer (its router prefix)
DICOMWEB_ROOT = "/dicom-web"
WADO_URI_ROOT = "/wado"
TOKEN_STORAGE_KEY = "pacs.ohif.token"
EXPIRY_STORAGE_KEY = "pacs.ohif.expires"
# Written by the web pages' hand-off (/ui/viewer/{study}, static/ui/viewer.js) next to the token: the user's
# language for OHIF, the CSRF token of the page session (for the viewer's sign-out button: POST /logout) and where
# the token came from ("pages": an expired token sends the user back through the pages' sign-in).
LANG_STORAGE_KEY = "pacs.ohif.lang"
CSRF_STORAGE_KEY = "pacs.ohif.csrf"
ORIGIN_STORAGE_KEY = "pacs.ohif.origin"
MARKER_FILE = "pacs-ohif.json"  # written last by the installer: the folder holds a complete viewer


class ViewerInstallError(PacsError):
    """The viewer could not be fetched, checked or installed; the message says what to do."""
