"""A live `pacs serve` (:class:`~tests.support.stack.EmbeddedPacs`) holding two facilities' studies, for the HTTP
tests that check who sees what: modality MODA belongs to HOSP-A, MODB to HOSP-B, so a study sent by MODA is
HOSP-A's. API tokens by account name, an httpx client per account, and the JSON error body every refusal has.

A test module subclasses :class:`FacilityArchive` to send its own studies and make its own accounts::

    class Archive(FacilityArchive):
        def __init__(self, server: EmbeddedPacs) -> None:
            super().__init__(server)
            self.study_a = self.send_instance("MODA", PatientID="PAT-A").StudyInstanceUID
            self.add_tokens(("rad-a", "radiologist", "HOSP-A"), ("patient-a", "patient", "HOSP-A",
                                                                 {"patient_id": "PAT-A"}))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pacs.aes import add_ae
from pacs.security.accounts import create_token
from tests.support.datasets import make_dataset
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs

CT = "1.2.840.10008.5.1.4.1.1.2"
MODALITIES = {"MODA": "HOSP-A", "MODB": "HOSP-B"}
"""Each registered modality's AE title and the facility its studies belong to."""

Account = tuple[str, str, str] | tuple[str, str, str, dict[str, str]]
"""(name, role, facility) or (name, role, facility, more create_token arguments such as patient_id)."""


class FacilityArchive:
    """``server`` with :data:`MODALITIES` registered; ``tokens`` maps an account name to its API token."""

    def __init__(self, server: EmbeddedPacs) -> None:
        self.server = server
        self.tokens: dict[str, str] = {}
        with server.ctx.sessions() as session, session.begin():
            for aet, facility in MODALITIES.items():
                add_ae(session, aet, "127.0.0.1", 104, facility=facility)

    @classmethod
    @contextmanager
    def serving(cls, root: Path, extra_env: dict[str, str] | None = None) -> Iterator[Self]:
        """A new `pacs serve` on ``root`` with this archive in it, stopped on leaving (also when filling fails)."""
        server = EmbeddedPacs(root, extra_env=extra_env)
        try:
            yield cls(server)
        finally:
            server.close()

    def send_instance(self, aet: str, **attrs: Any) -> Dataset:
        """C-STORE one CT instance (:func:`make_dataset` with ``attrs``) from modality ``aet``; it must be stored."""
        ds = make_dataset(**{"Modality": "CT", "SOPClassUID": CT, **attrs})
        assert send_dataset(self.server.port, ds, ExplicitVRLittleEndian, aet=aet).status == 0
        return ds

    def token(self, name: str, role: str, facility: str, **extra: str) -> str:
        with self.server.ctx.sessions() as session, session.begin():
            return create_token(session, name, role, days=1, facility=facility, **extra).secret  # type: ignore[arg-type]

    def add_tokens(self, *accounts: Account) -> None:
        """A token per account in ``tokens``."""
        for name, role, facility, *extra in accounts:
            self.tokens[name] = self.token(name, role, facility, **(extra[0] if extra else {}))

    def http(self, who: str | None) -> httpx.Client:
        """A client of the HTTP API with ``who``'s token, or with none (``None``: an anonymous caller)."""
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.server.http_url, timeout=60, headers=headers)


def json_error(response: httpx.Response, status: int) -> str:
    """The message of a refusal: ``status`` with the JSON body ``{"code", "message"}`` (a non-empty message)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"code", "message"} and body["message"], body
    return str(body["message"])
