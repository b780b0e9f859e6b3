"""Property-based fuzzing of every HTTP operation from the live OpenAPI document (schemathesis):
whatever the parameters and bodies, the API never answers 5xx, every error is JSON with a code and
a message, and the server stays up (issue 3, hostile input; issue 6, malformed query parameters)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.datasets import make_dataset
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 20


@schemathesis.serializer("multipart/related", "application/dicom")
def _raw_bytes(_ctx, value) -> bytes:  # type: ignore[no-untyped-def]
    """STOW-RS bodies: whatever was generated, as bytes (junk the server must refuse with a 4xx)."""
    return value if isinstance(value, bytes) else repr(value).encode()

_calls: list[int] = []


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    server = EmbeddedPacs(tmp_path_factory.mktemp("fuzz"), {"PACS_MAX_REQUEST_BYTES": str(8 * 1024 * 1024)})
    ds = make_dataset(Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    assert send_dataset(server.port, ds, "1.2.840.10008.1.2.1").status == 0  # something to find
    try:
        yield server
    finally:
        print(f"API fuzz: {len(_calls)} requests, statuses {sorted(set(_calls))}")
        server.close()


@pytest.fixture(scope="module")
def admin_token(pacs: EmbeddedPacs) -> str:
    return pacs.token("admin", name="fuzzer")


def test_no_input_makes_the_api_fail(pacs: EmbeddedPacs, admin_token: str) -> None:
    schema = schemathesis.openapi.from_url(f"{pacs.http_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 3
    failures: list[str] = []
    for operation in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def one(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(headers={"Authorization": f"Bearer {admin_token}"}, timeout=60)
            _calls.append(response.status_code)
            if response.status_code >= 500 or "Traceback" in response.text:
                failures.append(f"{case.method} {case.formatted_path} {case.query} -> {response.status_code}: "
                                f"{response.text[:200]}")
            elif response.status_code == 404 and case.formatted_path.startswith("/share-static/"):
                pass  # a static file of the share pages that does not exist
            elif response.status_code >= 400 and case.formatted_path.startswith("/s/"):
                # a share link's pages are for people: their errors are pages in the visitor's language
                if not (response.headers.get("content-type", [""])[0].startswith("text/html")
                        and "<main" in response.text):
                    failures.append(f"{case.method} {case.formatted_path} -> not an error page {response.text[:200]}")
            elif response.status_code >= 400:
                body = response.json()
                # errors are {"code","message"}; FHIR's are OperationOutcome; STOW-RS's the PS3.18 response
                # naming each failed instance (FailedSOPSequence 0008,1198) with its reason
                if not ({"code", "message"} <= set(body) or body.get("resourceType") == "OperationOutcome"
                        or "00081198" in body):
                    failures.append(f"{case.method} {case.formatted_path} -> non-JSON error {response.text[:200]}")

        one()
    assert not failures, "\n".join(failures[:20])


def test_server_still_healthy_after_the_fuzz_run(pacs: EmbeddedPacs) -> None:
    assert httpx.get(f"{pacs.http_url}/health", timeout=30).json()["status"] == "ok"
    assert pacs.proc.alive()
