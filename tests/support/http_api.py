"""Talking to a running pacs HTTP API from tests: tokens made with the real CLI, a bearer client."""

from __future__ import annotations

import json
import time

import httpx

from tests.support.pacs_process import run_pacs


def create_token(env: dict[str, str], role: str, *, name: str | None = None, facility: str = "",
                 patient_id: str = "", issuer: str = "", images: bool = False, days: int = 1) -> str:
    """A new API token from `pacs token create --json` (the secret)."""
    args = ["token", "create", name or f"test-{role}", "--role", role, "--days", str(days), "--json"]
    if facility:
        args += ["--facility", facility]
    if patient_id:
        args += ["--patient-id", patient_id]
    if issuer:
        args += ["--issuer", issuer]
    if images:
        args.append("--images")
    result = run_pacs(args, env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["token"]


def wait_http(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    # one client for every poll: a client costs ~30 ms of CPU (its TLS context), more than the poll itself
    with httpx.Client(timeout=2) as client:
        while True:
            try:
                if client.get(f"{base_url}/health").status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} did not answer /health within {timeout} s")
            time.sleep(0.1)


def bearer_client(base_url: str, token: str, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
