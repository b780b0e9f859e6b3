"""QR codes of share links, as PNG images the report PDF and the result slip place with fpdf2.

The code is made by ``segno`` (a maintained pure-Python QR encoder) with error correction at least
Q (25 % of the symbol may be lost: a folded, creased or smudged paper slip still scans); segno raises
the level further when that fits in the same symbol version. A share link's URL (``…/s/<token>``,
about 70 characters) is a version 4–5 symbol: 33–37 modules plus the 4-module quiet zone.

The PNG is black on white, one colour bit per pixel and a whole number of pixels per module, so it
stays sharp however the PDF scales it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import segno

from pacs.errors import InvalidInput

if TYPE_CHECKING:  # the pages' QR codes (qr_png) do not load the PDF library
    from fpdf import FPDF

__all__ = ["MAX_QR_TEXT", "QUIET_ZONE", "place_qr", "qr_code", "qr_png"]

MAX_QR_TEXT = 1000  # a share URL is ~70 characters; anything near this is not a URL we made
QUIET_ZONE = 4  # modules of white around the symbol, as ISO/IEC 18004 asks
_PIXELS_PER_MODULE = 10


def qr_code(text: str) -> segno.QRCode:
    """The QR symbol of ``text`` (error correction Q or better; never a Micro QR, which phones don't read)."""
    if not text or len(text) > MAX_QR_TEXT:
        raise InvalidInput(f"a QR code needs 1 to {MAX_QR_TEXT} characters of text")
    return segno.make_qr(text, error="q", boost_error=True)


def qr_png(text: str, *, pixels_per_module: int = _PIXELS_PER_MODULE) -> bytes:
    """The QR code of ``text`` as PNG bytes, with its quiet zone."""
    buffer = io.BytesIO()
    qr_code(text).save(buffer, kind="png", scale=pixels_per_module, border=QUIET_ZONE, dark="#000",
                       light="#fff")
    return buffer.getvalue()


def place_qr(pdf: FPDF, text: str, *, x: float, y: float, size: float) -> None:
    """Draw the QR code of ``text`` on the current page of ``pdf``: a ``size`` × ``size`` square (in the
    document's unit, quiet zone included) with its top-left corner at (``x``, ``y``)."""
    pdf.image(io.BytesIO(qr_png(text)), x=x, y=y, w=size, h=size)
