"""The archive the black-box tests (tests/test_blackbox.py) talk to: one the fixture starts (`pacs serve`), or a
running one named by the environment, reached only through its public doors (DIMSE and HTTP).

    PACS_TEST_TARGET_URL      base URL of the HTTP API, e.g. http://pacs.example:8000 (DICOMweb under /dicom-web)
    PACS_TEST_TARGET_DICOM    [AE@]host:port of the DICOM listener (AE title default PACS)
    PACS_TEST_TARGET_TOKEN    a bearer token that may search, read and store (an admin or technologist token)
    PACS_TEST_CALLING_AE      our AE title (default BLACKBOX), registered on the target for query/retrieve with the
                              address of this machine and the port below, e.g.
                              `pacs ae add BLACKBOX <this host> 11113 --archive-wide`
    PACS_TEST_MOVE_PORT       where the C-MOVE test listens for the target's sub-operations (default 11113)

The first three select the mode (all of them, or none). The tests only add data (a new patient each run) and
never delete anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TARGET_VARIABLES = ("PACS_TEST_TARGET_URL", "PACS_TEST_TARGET_DICOM", "PACS_TEST_TARGET_TOKEN")
DEFAULT_CALLING_AE = "BLACKBOX"


@dataclass(frozen=True)
class Target:
    http_url: str  # no trailing slash
    host: str
    port: int
    ae_title: str  # the archive's
    token: str
    calling_ae: str  # ours: registered on the archive, with move_port as its port
    move_port: int

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"


def parse_dicom_address(value: str) -> tuple[str, str, int]:
    """``[AE@]host:port`` -> (AE title, host, port)."""
    ae_title, _, address = value.rpartition("@")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"PACS_TEST_TARGET_DICOM={value!r}: expected [AE@]host:port")
    return ae_title or "PACS", host, int(port)


def target_from_environment(environ: dict[str, str] | None = None) -> Target | None:
    """The running archive the environment names, or None when it names none."""
    env = os.environ if environ is None else environ
    given = [name for name in TARGET_VARIABLES if env.get(name)]
    if not given:
        return None
    if len(given) != len(TARGET_VARIABLES):
        missing = ", ".join(n for n in TARGET_VARIABLES if n not in given)
        raise ValueError(f"black-box target incomplete: set {missing} as well (or none of {TARGET_VARIABLES})")
    ae_title, host, port = parse_dicom_address(env["PACS_TEST_TARGET_DICOM"])
    return Target(http_url=env["PACS_TEST_TARGET_URL"].rstrip("/"), host=host, port=port, ae_title=ae_title,
                  token=env["PACS_TEST_TARGET_TOKEN"], calling_ae=env.get("PACS_TEST_CALLING_AE", DEFAULT_CALLING_AE),
                  move_port=int(env.get("PACS_TEST_MOVE_PORT", "11113")))
