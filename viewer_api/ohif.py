"""``/ohif/``: the OHIF viewer's static files (installed by ``pacs viewer install-ohif``) and its sign-in page.

No token here: the files hold no patient data, and a browser cannot add a header to a page navigation. Every
data request the viewer makes goes to the DICOMweb routes with the user's bearer token (pacs.viewer.app_config).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from pacs.viewer.site import SiteFile, ViewerSite, accepts_gzip
from viewer_api.errors import ApiError
from viewer_api.security import context

router = APIRouter(tags=["viewer"], include_in_schema=False)


@router.api_route("/ohif", methods=["GET", "HEAD"])
def viewer_root(request: Request) -> RedirectResponse:
    query = f"?{request.url.query}" if request.url.query else ""
    return RedirectResponse(f"/ohif/{query}", status_code=308)


@router.api_route("/ohif/{path:path}", methods=["GET", "HEAD"])
def viewer_file(path: str, request: Request) -> FileResponse:
    site = ViewerSite(context(request).settings.effective_ohif_dir)
    if not site.installed():
        raise ApiError(404, "viewer_not_installed",
                       "the OHIF viewer is not installed: run `pacs viewer install-ohif` on the server "
                       "(PACS_OHIF_DIR chooses the folder)")
    found = site.resolve(path, accepts_gzip(request.headers.get("accept-encoding", "")))
    if found is None:
        raise ApiError(404, "not_found", f"the viewer has no file /ohif/{path}")
    return file_response(found)


def file_response(found: SiteFile) -> FileResponse:
    """A viewer file as served: its cache policy, and its precompressed form when the client takes gzip."""
    headers = {"Cache-Control": found.cache_control}
    if found.compressible:
        headers["Vary"] = "Accept-Encoding"
    if found.gzip:
        headers["Content-Encoding"] = "gzip"
    return FileResponse(found.path, media_type=found.media_type, headers=headers)
