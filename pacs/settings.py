"""One typed settings object, built at each entry point and passed down.

Values come from ``PACS_*`` environment variables, then an optional TOML file named by
``PACS_CONFIG_FILE``, then the embedded defaults: everything under one data folder
(SQLite index, filesystem objects, in-process workers).
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives again with different content."""

    VERSION = "version"  # keep the new one current, keep the old one retrievable as a prior version
    REJECT = "reject"  # refuse the new one; the stored one stays
    KEEP_EXISTING = "keep-existing"  # acknowledge, keep the stored one, discard the new bytes


#: Days a rejected instance stays restorable per IOCM reason (pacs.studies.models) before the sweep deletes it.
REJECTION_RETENTION_DEFAULTS: dict[str, int] = {"quality": 30, "patient-safety": 0, "incorrect-worklist-entry": 30,
                                                "retention-expired": 0}


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the optional config file named by PACS_CONFIG_FILE (keys as field names)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("PACS_CONFIG_FILE")
        self._data: dict[str, Any] = {}
        if path:
            with open(path, "rb") as fh:
                self._data = tomllib.load(fh)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """The effective configuration of one process."""

    model_config = SettingsConfigDict(env_prefix="PACS_", extra="ignore")

    data_dir: Path = Field(default=Path("pacs-data"), description="Folder holding all embedded-mode state")
    database_url: str = Field(default="", description="SQLAlchemy URL; default SQLite in the data folder")
    storage_url: str = Field(default="", description="file:// path or s3://KEY:SECRET@host:port/bucket; several "
                             "endpoints of one S3 store: s3://KEY:SECRET@host1:9000,host2:9000/bucket (fails over "
                             "between them on connection errors)")
    broker_url: str = Field(default="", description="Celery broker; empty runs tasks in-process")

    ae_title: str = "PACS"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    dicom_tls_port: int = Field(default=2762, description="DICOM TLS listener, started when tls_cert_file is set")
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate (chain) of the DICOM TLS listener")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of that certificate")
    tls_ca_file: Path | None = Field(default=None, description="PEM CA bundle that peers' certificates must chain to")
    tls_require_client_cert: bool = Field(default=False, description="Mutual TLS: refuse peers without a valid cert")
    http_host: str = "127.0.0.1"
    http_port: int = 8000

    max_pdu_size: int = Field(default=262_144, ge=4096, le=16_777_216)
    max_associations: int = Field(default=32, ge=1, le=1000)
    network_timeout_s: float = Field(default=60.0, gt=0)
    accept_unknown_store_aes: bool = True
    max_object_bytes: int = Field(default=1024**3, description="Largest single object accepted; over DIMSE a "
                                  "larger one is aborted while it arrives: what one association may hold in memory")
    # hostile input and association limits
    max_inflated_bytes: int = Field(default=512 * 1024**2, ge=1024, description="A deflated dataset inflating "
                                    "past this is refused as a decompression bomb (never inflated in full)")
    max_associations_per_peer: int = Field(default=8, ge=1, le=1000, description="Concurrent associations from "
                                           "one peer address; more get A-ASSOCIATE-RJ (2, 3, 2) local limit exceeded")
    dicom_reserved_associations: int = Field(default=4, ge=0, le=1000, description="Association slots (of "
                                             "PACS_MAX_ASSOCIATIONS) only registered AEs that proved who they are "
                                             "(host check or TLS certificate) may take")
    dicom_acse_timeout_s: float = Field(default=30.0, gt=0, description="A connection that sends no "
                                        "A-ASSOCIATE-RQ (or an association negotiation stuck) is closed after this")
    dicom_preassoc_timeout_s: float = Field(default=5.0, gt=0, description="A connection that has not sent a "
                                            "whole A-ASSOCIATE-RQ (nor finished its TLS handshake) this long after "
                                            "connecting is closed")
    dicom_max_unassociated: int = Field(default=0, ge=0, le=10_000, description="Connections that have not "
                                        "associated yet, in all (0: PACS_MAX_ASSOCIATIONS); when full, the oldest "
                                        "one of the address holding most is closed for a newcomer")
    dicom_max_unassociated_per_peer: int = Field(default=0, ge=0, le=1000, description="Connections from one "
                                                 "address that have not associated yet (0: "
                                                 "PACS_MAX_ASSOCIATIONS_PER_PEER); more are closed at once")
    dicom_processes: int = Field(default=0, ge=0, le=64, description="DICOM receiving processes accepting from "
                                 "the DICOM port(s), started by `pacs serve` / `pacs scp`; workers, relays and "
                                 "schedulers still run once, in the parent. 1: the DICOM services run in the main "
                                 "process; 0: the usable cores, up to 4 (pacs.receiving_processes)")
    dicom_drain_s: float = Field(default=20.0, ge=0, description="On shutdown, how long the DICOM "
                                 "listeners (in `pacs serve` or each receiving process) wait for open associations "
                                 "to end before they close them")

    duplicate_policy: DuplicatePolicy = DuplicatePolicy.VERSION
    assume_utf8_for_latin1: bool = Field(
        default=True,
        description="Decode text labelled ISO_IR 100 as UTF-8 when it is valid UTF-8 (common with "
        "Vietnamese modalities that send UTF-8 under the default label)",
    )
    in_process_workers: int = Field(default=2, ge=0, le=64)
    outbox_poll_s: float = Field(default=5.0, gt=0)
    task_requeue_s: float = Field(
        default=600.0, gt=0, description="Publish again derived work queued this long ago and still not done "
        "(its message was lost with a broker or worker); also the Redis visibility timeout")
    task_queue: str = Field(default="pacs-derived", pattern=r"^[A-Za-z0-9._-]{1,64}$",
                            description="Celery queue for derived work (one per archive on a shared broker)")
    task_max_attempts: int = Field(default=10, ge=1, description="Transient failures before a task is failed")
    task_lease_s: float = Field(default=30.0, ge=3, description="A process holding derived tasks beats every "
                                "third of this; one silent this long is taken for dead and its tasks run again "
                                "(on the same host a dead process is seen at once)")
    task_max_crashes: int = Field(default=3, ge=1, description="Times a derived task may be in flight when its "
                                  "process dies before it is failed (a poison object ends `failed`, not in a loop)")
    thumbnail_size: int = Field(default=128, ge=16, le=1024)
    max_decoded_mib: int = Field(default=256, ge=16, le=65_536, description="Most memory one decode of pixel "
                                 "data may need (thumbnails, rendering, frames, transcoding); bigger objects are "
                                 "kept and served as stored only")
    decode_budget_mib: int = Field(default=256, ge=16, le=65_536, description="Memory all concurrent decodes of "
                                   "one process share; a decode waits for its share")
    log_level: str = "INFO"
    log_format: str = Field(default="text", pattern=r"^(text|json)$", description="Log lines as plain text, or "
                            "as JSON objects one per line (time, level, logger, message, role) for a log collector; "
                            "either way without patient names, IDs or birth dates")
    # -- monitoring (pacs.metrics, pacs.health): /metrics, /health/live, /health/ready -------------------------
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Port of GET /metrics for `pacs scp`, "
                              "`pacs worker` and `pacs hl7 listen` (they have no HTTP API); 0: off. `pacs serve` "
                              "and `pacs api` serve /metrics on the HTTP port")
    metrics_host: str = Field(default="127.0.0.1", description="Address the metrics port binds to (loopback by "
                              "default; 0.0.0.0 for a scraper on another host, with PACS_METRICS_ALLOW)")
    metrics_allow: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"], description="Addresses and "
                                     "CIDRs that may read /metrics without a token (JSON list, e.g. "
                                     "'[\"10.0.5.0/24\"]'). Metrics hold no patient data, but they tell an outsider "
                                     "how busy each facility's modalities are: the scraper's network is allowed "
                                     "by address (scrapers rarely carry tokens); anyone else needs a bearer token "
                                     "with the ops.metrics capability (admin). The metrics port checks addresses "
                                     "only")
    series_settle_s: float = Field(
        default=2.0, ge=0, description="A series' metadata document is rebuilt once no instance has arrived "
        "for it for this long (not once per instance while a study streams in)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls))

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        value = value.strip()
        if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
            raise ValueError("AE title must be 1-16 printable characters without backslash")
        return value

    @field_validator("metrics_allow")
    @classmethod
    def _check_metrics_allow(cls, value: list[str]) -> list[str]:
        from pacs.metrics import parse_allow_list

        parse_allow_list(value)  # ValueError naming a bad entry
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("DICOM TLS needs both tls_cert_file and tls_key_file")
        if self.tls_require_client_cert and self.tls_ca_file is None:
            raise ValueError("tls_require_client_cert needs tls_ca_file to verify client certificates")
        return self

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        if self.oidc_issuer and not (self.oidc_audience and self.oidc_jwks_url):
            raise ValueError("OIDC needs oidc_audience (tokens minted for other applications are refused) "
                             "and oidc_jwks_url besides oidc_issuer")
        if self.oidc_client_id and "openid" not in self.oidc_scopes.split():
            raise ValueError("oidc_scopes must include 'openid' (the sign-in needs an ID token)")
        if self.auth_secret and len(self.auth_secret.encode()) < 32:
            raise ValueError("auth_secret must be at least 32 bytes (e.g. `openssl rand -base64 48`)")
        if self.auth_secret and ("change-me" in self.auth_secret.lower() or len(set(self.auth_secret)) < 12):
            # the deploy/ examples' placeholders are long enough: an archive started with one would sign share
            # sessions, CSRF tokens and API tokens with a key anyone can read on GitHub
            raise ValueError("auth_secret is a placeholder or too uniform: make one with `openssl rand -base64 48`")
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    @property
    def effective_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return f"file://{(self.data_dir / 'objects').resolve()}"

    @property
    def embedded_workers(self) -> bool:
        """True when derived work runs in this process instead of on a Celery broker."""
        return not self.broker_url

    def masked(self) -> dict[str, Any]:
        """The effective configuration with passwords and secret keys replaced by ***."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path | StrEnum) else value
        # Any other URL-like value (OIDC, JWKS, public URL, ...): no user information, no credential parameters.
        for name, value in out.items():
            if isinstance(value, str) and "://" in value:
                out[name] = mask_url(value, keep_user=False)
        out["database_url"] = mask_url(self.effective_database_url)
        out["storage_url"] = mask_url(self.effective_storage_url)
        out["broker_url"] = mask_url(self.broker_url) if self.broker_url else "(in-process)"
        out["auth_secret"] = "***" if self.auth_secret else "(generated in the data folder)"
        return out

    # -- forwarding (pacs.forwarding): the C-STORE sender's queue ---------------------------------
    commitment_poll_s: float = Field(default=2.0, gt=0, description="How often pending commitment reports are tried")
    commitment_max_attempts: int = Field(default=40, ge=1, description="Report attempts before a request is failed")
    commitment_retry_base_s: float = Field(default=10.0, gt=0, description="First wait between report attempts")
    commitment_retry_max_s: float = Field(default=600.0, gt=0, description="Longest wait between report attempts")
    commitment_lease_s: float = Field(default=600.0, gt=0, description="A claimed report is left to others this long")
    forward_poll_s: float = Field(default=2.0, gt=0, description="How often the forward queue is checked")
    forward_batch_size: int = Field(default=50, ge=1, le=128, description="Objects sent per association")
    forward_max_attempts: int = Field(default=20, ge=1, description="Failed attempts before a job is failed")
    forward_retry_base_s: float = Field(default=5.0, gt=0, description="First retry wait; doubles per attempt")
    forward_retry_max_s: float = Field(default=600.0, gt=0, description="Longest wait between attempts")
    forward_lease_s: float = Field(default=600.0, gt=0, description="A claimed batch is left to others this long "
                                   "(renewed while sending); jobs of a crashed sender wait at most this long")


    # -- HTTP security (pacs.security, viewer_api) --------------------------------------------------
    auth_secret: str = Field(default="", description="Key that signs login session tokens; every API process of "
                             "one archive needs the same. Empty: generated once into the data folder")
    session_token_ttl_s: int = Field(default=3600, ge=60, le=86_400, description="Lifetime of a login token")
    api_token_default_days: int = Field(default=365, ge=1, le=3650, description="Default API token lifetime")
    oidc_issuer: str = Field(default="", description="OIDC issuer whose JWTs are accepted (empty: OIDC off)")
    oidc_audience: str = Field(default="", description="Audience (aud) those JWTs must carry")
    oidc_jwks_url: str = Field(default="", description="The issuer's JWKS URL (signing keys)")
    oidc_role_claim: str = Field(default="roles", description="Claim holding the user's role(s)")
    oidc_facility_claim: str = Field(default="facility", description="Claim holding the user's facility")
    oidc_client_id: str = Field(default="", description="Client id of the web pages at the OIDC provider; with "
                                "oidc_issuer it turns on 'Sign in with …' (redirect URI: "
                                "{public URL}/login/oidc/callback)")
    oidc_client_secret: str = Field(default="", description="Client secret (sent as client_secret_basic); empty: a "
                                    "public client proven by PKCE alone")
    oidc_provider_name: str = Field(default="", description="Name on the sign-in button (default: the issuer's host)")
    oidc_scopes: str = Field(default="openid profile", description="Scopes asked for at sign-in (must include openid)")
    oidc_authorization_url: str = Field(default="", description="Authorization endpoint (default: from the issuer's "
                                        "/.well-known/openid-configuration)")
    oidc_token_url: str = Field(default="", description="Token endpoint (default: from discovery)")
    oidc_end_session_url: str = Field(default="", description="End-session endpoint: sign-out also signs out there "
                                      "(default: from discovery; none: local sign-out only)")
    cors_origins: list[str] = Field(default_factory=list, description="Browser origins allowed to call the API")
    max_request_bytes: int = Field(default=1024**3, ge=1024, description="Largest HTTP request body (STOW-RS)")
    upload_max_files: int = Field(default=20_000, ge=1, description="Files in one upload (POST "
                                  "/api/studies/upload): form parts plus the entries of its zips")
    upload_max_unpacked_bytes: int = Field(default=4 * 1024**3, ge=1024, description="Total size of the files "
                                           "an upload's zips unpack to (their declared sizes, checked first)")
    upload_max_zip_ratio: float = Field(default=100.0, ge=1, description="Largest unpacked/packed size ratio of "
                                        "an uploaded zip of more than 64 MiB unpacked (a zip bomb is refused)")
    login_attempts_per_minute: int = Field(default=10, ge=1, description="Per client address and per user name")
    login_max_concurrent_verifications: int = Field(
        default=2, ge=1, le=64, description="Password checks (argon2: 64 MiB and ~0.1 s CPU each) running at once "
        "per HTTP process; a login that cannot start one within 1 s gets 503")
    http_max_connections: int = Field(default=500, ge=1, description="Concurrent HTTP connections; more get 503 "
                                      "(put a reverse proxy with header/body timeouts in front on open networks)")
    http_request_timeout_s: float = Field(default=300.0, gt=0, description="Longest time to receive a request body")
    http_header_timeout_s: float = Field(default=10.0, gt=0, description="A connection that has not sent a "
                                         "request's whole headers this long after connecting (or after its "
                                         "first byte, between keep-alive requests) is closed")
    http_max_connections_per_client: int = Field(default=64, ge=1, description="Concurrent HTTP connections from "
                                                 "one client address; more are answered 503 and closed at once")
    trusted_proxies: list[str] = Field(default_factory=list, description="Load balancers / reverse proxies "
                                       "believed about the real client (JSON list of addresses and CIDRs, e.g. "
                                       "'[\"10.0.5.0/24\"]'; [] = none): their DICOM connections must start "
                                       "with a PROXY protocol v1/v2 header, their HTTP requests' X-Forwarded-For "
                                       "is honoured. From other peers both are ignored (a PROXY header is an "
                                       "invalid PDU)")
    trusted_hosts: list[str] = Field(default_factory=list, description="Host header values the HTTP API "
                                     "answers (JSON list; '*.example.org' matches subdomains). Always trusted: "
                                     "localhost, the address a connection arrived at, this machine's names, "
                                     "PACS_PUBLIC_URL's host and PACS_HTTP_HOST; other hosts get 400")
    public_url: str = Field(default="", description="This server's external base URL (e.g. https://pacs.example) "
                            "for absolute URLs in DICOMweb and FHIR answers; empty: taken from each request")
    audit_coalesce_s: float = Field(default=60.0, ge=0, description="Repeated frame/rendered/thumbnail/bulk data "
                                    "reads of one study by one principal within this window share one audit row "
                                    "(0: a row per request)")

    # reports
    hl7_destination_facilities: dict[str, list[str]] = Field(
        default_factory=dict, description="Which facilities' reports each HL7 destination receives (JSON: "
        "destination name → facility codes). A destination not named here receives every facility's reports")
    facility_names: dict[str, str] = Field(default_factory=dict, description="Printed names of facilities on "
                                           "reports (JSON: code → name, e.g. '{\"HOSP-A\": \"Bệnh viện Tỉnh\"}')")

    # one person, one record (pacs.persons): records that share a national identifier are one person
    national_id_issuers: list[str] = Field(default_factory=list, description="Issuer of Patient ID values that "
                                           "name a national identifier (JSON list, e.g. '[\"CCCD\", \"BHXH\"]'), "
                                           "read from the Patient ID and the Other Patient IDs Sequence. Empty: "
                                           "records are never linked into persons")
    national_id_attribute: str = Field(default="", description="Optionally SYSTEM:ATTRIBUTE, a DICOM keyword or "
                                       "8-hex-digit tag whose value is a national ID of that system (one of "
                                       "national_id_issuers), e.g. 'BHXH:InsurancePlanIdentification'")
    priors_across_facilities: list[str] = Field(default_factory=lambda: ["radiologist", "clinician"],
                                                description="Roles that also see other facilities' studies of a "
                                                "person with a study visible to their facility (JSON list; [] = "
                                                "nobody; 'patient' is refused)")

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        from pacs.trusted_proxies import parse_networks

        parse_networks(value)
        return value

    @field_validator("priors_across_facilities")
    @classmethod
    def _check_priors_roles(cls, value: list[str]) -> list[str]:
        from pacs.persons.scope import check_roles

        return check_roles(value)

    @model_validator(mode="after")
    def _check_national_ids(self) -> Settings:
        from pacs.persons.identifiers import NationalIdPolicy

        if self.national_id_attribute.strip() and not self.national_id_issuers:
            raise ValueError("national_id_attribute needs national_id_issuers (the systems it may name)")
        NationalIdPolicy.from_settings(self.national_id_issuers, self.national_id_attribute)  # ValueError if bad
        return self

    # share links (pacs.sharing): /s/{token} opens one study's report without login
    share_link_default_days: int = Field(default=30, ge=1, le=365, description="Lifetime of a share link when "
                                         "its creator names none (1-365 days)")
    share_link_max_failures: int = Field(default=5, ge=1, le=100, description="Wrong birth dates (over the "
                                         "link's life) after which a share link locks (until revoked and made again)")
    share_open_failures_per_minute: int = Field(default=20, ge=1, description="Failed share-link opens (unknown "
                                                "tokens, wrong birth dates, opens of expired, revoked or locked "
                                                "links) per client address (IPv6: per /64) per minute; more "
                                                "are answered 429 without touching the database")
    share_session_ttl_s: int = Field(default=1800, ge=60, le=86_400, description="Lifetime of the viewer session "
                                     "a share link of scope 'study' opens, and of the cookie that remembers a "
                                     "correct birth date (the link itself is re-checked on every request)")

    # teleconsultation (pacs.consults): the consulted facility sees the study while the consult is open
    consult_default_days: int = Field(default=14, ge=1, le=365, description="Lifetime of a consult (and of the "
                                      "consulted side's access to its study) when the requester names none")
    consult_max_days: int = Field(default=90, ge=1, le=365, description="Longest lifetime a consult may be "
                                  "given (expires_in_days above it is refused)")

    # OHIF viewer
    ohif_dir: Path | None = Field(default=None, description="Folder of the OHIF viewer served under /ohif/ "
                                  "(`pacs viewer install-ohif`); default DATA_DIR/ohif")

    # -- HL7 v2 over MLLP (pacs.hl7): orders in (ORM^O01), report results out (ORU^R01) ------------
    hl7_host: str = Field(default="127.0.0.1", description="Address the HL7 MLLP listener binds to "
                          "(loopback by default: MLLP has no authentication; open it to the EMR's network only)")
    hl7_port: int = Field(default=2575, ge=0, le=65535, description="HL7 MLLP listener port (`pacs serve`, "
                          "`pacs hl7 listen`); 0 turns the listener off")
    hl7_max_message_bytes: int = Field(default=1024**2, ge=1024, description="Largest HL7 message accepted; a "
                                       "larger one is refused (AR) while it arrives, never held in memory whole")
    hl7_max_connections: int = Field(default=32, ge=1, le=1000, description="Concurrent MLLP connections; more "
                                     "are closed at once")
    hl7_timeout_s: float = Field(default=30.0, gt=0, description="Idle time allowed inside an MLLP connection "
                                 "(a started message must arrive within twice this); also the connect/ACK "
                                 "timeout of outbound delivery")
    hl7_default_facility: str = Field(default="", description="Facility given to orders received over HL7; "
                                      "empty: the sending facility (MSH-4)")
    hl7_destinations: dict[str, str] = Field(default_factory=dict, description="Where signed reports are sent "
                                             "as ORU^R01: JSON name → \"host:port\", e.g. "
                                             "'{\"emr\": \"10.0.0.5:2575\"}'")
    hl7_receiving_application: str = Field(default="", description="MSH-5 of the ORU^R01 we send (default: "
                                           "the destination's name)")
    hl7_receiving_facility: str = Field(default="", description="MSH-6 of the ORU^R01 we send")
    hl7_poll_s: float = Field(default=2.0, gt=0, description="How often the HL7 outbound queue is checked")
    hl7_max_attempts: int = Field(default=20, ge=1, description="Delivery attempts before an HL7 message is failed")
    hl7_retry_base_s: float = Field(default=5.0, gt=0, description="First wait between HL7 delivery attempts; "
                                    "doubles per attempt")
    hl7_retry_max_s: float = Field(default=600.0, gt=0, description="Longest wait between HL7 delivery attempts")
    hl7_lease_s: float = Field(default=120.0, gt=0, description="A claimed HL7 message is left to other senders "
                                "this long (crash safety)")

    @field_validator("hl7_destinations")
    @classmethod
    def _check_hl7_destinations(cls, value: dict[str, str]) -> dict[str, str]:
        from pacs.hl7.mllp import parse_address

        for name, address in value.items():
            bare = name.replace("-", "").replace("_", "").replace(".", "")
            if not 1 <= len(name) <= 64 or not (bare.isascii() and bare.isalnum()):
                raise ValueError(f"HL7 destination name {name!r}: 1-64 letters, digits, '.', '-' or '_'")
            parse_address(address)
        return value

    # -- retention (pacs.studies.retention): rejected objects and whole studies deleted after a time ---------
    rejection_retention_days: dict[str, int] = Field(
        default_factory=lambda: dict(REJECTION_RETENTION_DEFAULTS),
        description="Days a rejected instance is kept (restorable) before the retention sweep deletes it, per "
        "rejection reason (JSON, e.g. '{\"quality\": 30, \"patient-safety\": 0}'; 0: at the next sweep, -1: "
        "never automatically). Reasons not named keep their defaults")
    retention_sweep_s: float = Field(default=3600.0, gt=0, description="How often rejected instances past "
                                     "their retention are deleted (`pacs serve`, `pacs worker`)")
    study_retention_years: dict[str, int] = Field(
        default_factory=dict, description="Years a study is kept, per facility, counted from its study date (or "
        "the day it was received when it has none); '*' for facilities not named, 0 or absent: forever (JSON, "
        "e.g. '{\"HOSP-A\": 15, \"*\": 0}'). Due studies are listed (`pacs retention due`) and deleted only "
        "when an admin confirms")

    @field_validator("rejection_retention_days")
    @classmethod
    def _check_rejection_retention(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(REJECTION_RETENTION_DEFAULTS))
        if unknown:
            raise ValueError(f"rejection_retention_days: unknown reason(s) {', '.join(unknown)}; known: "
                             f"{', '.join(REJECTION_RETENTION_DEFAULTS)}")
        if any(days < -1 for days in value.values()):
            raise ValueError("rejection_retention_days: days are 0 or more (-1: never automatically)")
        return {**REJECTION_RETENTION_DEFAULTS, **value}

    @field_validator("study_retention_years")
    @classmethod
    def _check_study_retention(cls, value: dict[str, int]) -> dict[str, int]:
        if any(years < 0 or years > 200 for years in value.values()):
            raise ValueError("study_retention_years: years are 0 (forever) to 200")
        return value

    @property
    def effective_ohif_dir(self) -> Path:
        return self.ohif_dir if self.ohif_dir is not None else self.data_dir / "ohif"


def mask_url(url: str, *, keep_user: bool = True) -> str:
    """Hide a URL's password (all its user information unless ``keep_user``) and credential query parameters."""
    from pacs.security.redaction import mask_url as _mask

    return _mask(url, keep_user=keep_user)
