"""deploy/ stays true: the compose file parses and the Kubernetes manifests validate against the Kubernetes
schemas, the systemd units pass `systemd-analyze verify`, every PACS_* variable any of them sets is a real
setting, every command they run is a real `pacs` subcommand, and deploy/multi-host.md lists every port and
every secret they use."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pacs.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package) is needed to check deploy/docker-compose.yml"
    result = subprocess.run([tool, "--env-file", str(DEPLOY / "env.example"), "-f", str(DEPLOY / "docker-compose.yml"),
                             "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_has_every_process_role(compose: dict) -> None:
    services = compose["services"]
    assert {"minio1", "minio2", "minio3", "minio4", "postgres", "redis", "migrate", "scp", "api", "worker",
            "hl7", "dicom-lb"} <= set(services)
    assert services["hl7"]["command"] == ["hl7", "listen"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["command"][0] == "worker" and services["scp"]["command"] == ["scp"]


def test_compose_sets_only_real_settings(compose: dict) -> None:
    fields = {f"PACS_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for var in service.get("environment", {}) or {}:
            if var.startswith("PACS_"):
                assert var in fields, f"{name} sets {var}, which no setting reads"


def operator_settings(env: dict[str, str]) -> Settings:
    """The settings of an example environment as an operator fills it in: the examples' auth secret is a
    placeholder, which the archive refuses to start with (checked here), so a real one replaces it. Complex
    settings (dicts, lists) come as JSON from the environment, as pydantic-settings reads them."""
    values: dict[str, Any] = {k.removeprefix("PACS_").lower(): json.loads(v) if v[:1] in "{[" and v else v
                              for k, v in env.items() if k.startswith("PACS_")}
    if "change-me" in str(values.get("auth_secret", "")).lower():
        with pytest.raises(ValueError, match="placeholder"):
            Settings(**values)
        values["auth_secret"] = secrets.token_urlsafe(48)
    return Settings(**values)


def test_compose_configuration_is_accepted_by_settings(compose: dict) -> None:
    env = compose["services"]["scp"]["environment"]
    # complex settings (dicts, lists) come as JSON from the environment, as pydantic-settings reads them
    settings = operator_settings(env)
    assert settings.effective_database_url.startswith("postgresql+psycopg://pacs:")
    # the balancer in front of the four MinIO nodes, never one node (issue 17)
    assert settings.effective_storage_url.endswith("@minio-lb:9000/dicom") and not settings.embedded_workers


# -- the MinIO balancer (no single object-store endpoint) ----------------------------------------------------

def _haproxy_servers(cfg: str, backend: str) -> list[str]:
    """``host:port`` of the server lines of one backend section of an HAProxy configuration."""
    servers, inside = [], False
    for line in cfg.splitlines():
        words = line.split()
        if line[:1].strip():  # a section header
            inside = words[:2] == ["backend", backend]
        elif inside and words[:1] == ["server"]:
            servers.append(words[2])
    return servers


def test_store_is_reached_through_a_balancer_of_every_minio_node(compose: dict) -> None:
    services = compose["services"]
    minio_nodes = sorted(name for name in services if re.fullmatch(r"minio\d+", name))
    for name, service in services.items():
        url = (service.get("environment") or {}).get("PACS_STORAGE_URL")
        if url is not None:
            assert urlsplit(url).hostname == "minio-lb", f"{name} reaches the store through one node: {url}"
    balancer = services["minio-lb"]
    assert any(str(v).startswith(str(DEPLOY / "minio-lb.cfg") + ":") for v in _volume_sources(balancer))
    cfg = (DEPLOY / "minio-lb.cfg").read_text()
    assert _haproxy_servers(cfg, "minio") == [f"{node}:9000" for node in minio_nodes]
    assert "http-check send meth GET uri /minio/health/live" in cfg and "check" in cfg


def _volume_sources(service: dict) -> list[str]:
    out = []
    for volume in service.get("volumes", []):
        out.append(f"{volume['source']}:{volume['target']}" if isinstance(volume, dict) else str(volume))
    return out


@pytest.mark.parametrize("cfg", ["minio-lb.cfg", "haproxy.cfg"])
def test_haproxy_configurations_parse(cfg: str) -> None:
    tool = shutil.which("haproxy")
    assert tool, "haproxy (Debian package, scripts/bootstrap.sh) is needed to check deploy/*.cfg"
    result = subprocess.run([tool, "-c", "-f", str(DEPLOY / cfg)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # outside Docker the service names do not resolve; anything else is a real warning
    warnings = [line for line in (result.stdout + result.stderr).splitlines()
                if "WARNING" in line and "could not resolve address" not in line]
    assert not warnings, warnings


# -- whose PROXY header / X-Forwarded-For is believed: exactly the balancer, never a range others share --------

def test_compose_trusts_proxy_headers_from_dicom_lb_alone(compose: dict) -> None:
    services = compose["services"]
    network = compose["networks"]["default"]["ipam"]["config"]
    assert len(network) == 1
    subnet, dynamic = ipaddress.ip_network(network[0]["subnet"]), ipaddress.ip_network(network[0]["ip_range"])
    lb = services["dicom-lb"]["networks"]["default"]["ipv4_address"]
    # dicom-lb's fixed address is on the network, outside the range Docker numbers the other containers from
    assert ipaddress.ip_address(lb) in subnet and ipaddress.ip_address(lb) not in dynamic
    assert dynamic.subnet_of(subnet)  # type: ignore[arg-type]
    assert json.loads(services["scp"]["environment"]["PACS_TRUSTED_PROXIES"]) == [lb]
    assert "send-proxy-v2" in (DEPLOY / "haproxy.cfg").read_text()
    # nobody else believes a PROXY header or an X-Forwarded-For (the api is reached directly on 8000)
    assert [name for name, service in services.items()
            if "PACS_TRUSTED_PROXIES" in (service.get("environment") or {})] == ["scp"]


# -- Kubernetes ---------------------------------------------------------------------------------------------

K8S = DEPLOY / "k8s"
SETTING_NAMES = {f"PACS_{name.upper()}" for name in Settings.model_fields}
PACS_IMAGE = "filmless-pacs"


@functools.cache  # parsed once per run (read-only)
def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_documents() if doc["kind"] == kind]


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) of every Deployment, StatefulSet and Job."""
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"]) for _, doc in _k8s_documents()
            if doc["kind"] in ("Deployment", "StatefulSet", "Job")]


def _pacs_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, pod in _pod_templates() for c in pod["containers"]
            if c["image"].split(":")[0] == PACS_IMAGE]


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    docs = _k8s_documents()
    assert len(docs) >= 20
    # the oldest Kubernetes still commonly run, and the newest schemas the validator bundles (offline)
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        for filename, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"k8s/{filename}: {doc['kind']}/{doc['metadata']['name']} at "
                            f"{'.'.join(map(str, exc.path))}: {exc.message} (Kubernetes {version})")


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # an apply must never overwrite the real Secret with the placeholders of secret.yaml
    assert sorted(kustomization["resources"]) == sorted(manifests - {"secret.yaml"})
    assert [image["name"] for image in kustomization["images"]] == [PACS_IMAGE]
    assert {doc["metadata"].get("namespace") for _, doc in _k8s_documents() if doc["kind"] != "Namespace"} \
        == {kustomization["namespace"]}


def _k8s_environment() -> dict[str, str]:
    """What a pacs container sees: the ConfigMap and the Secret it takes whole, then its own env."""
    config = next(doc for doc in _of_kind("ConfigMap") if doc["metadata"]["name"] == "pacs-config")["data"]
    secret = _of_kind("Secret")[0]["stringData"]
    return {**config, **secret}


def test_k8s_sets_only_real_settings() -> None:
    names = set(_k8s_environment())
    for _, container in _pacs_containers():
        names |= {var["name"] for var in container.get("env", [])}
    assert {name for name in names if name.startswith("PACS_")} - SETTING_NAMES == set()
    assert {"PACS_DATABASE_URL", "PACS_STORAGE_URL", "PACS_BROKER_URL", "PACS_AUTH_SECRET"} <= names


def test_k8s_configuration_is_accepted_by_settings() -> None:
    env = _k8s_environment()
    for _, container in _pacs_containers():
        merged = {**env, **{var["name"]: var["value"] for var in container.get("env", [])}}
        settings = operator_settings(merged)
        assert settings.effective_database_url.startswith("postgresql+psycopg://")
        assert "sslmode=verify-full" in settings.effective_database_url
        assert urlsplit(settings.effective_storage_url).hostname == "minio.pacs.svc"  # the Service, not a pod
        assert not settings.embedded_workers


def test_k8s_references_resolve() -> None:
    """envFrom, secretKeyRef, configMap volumes and named probe ports point at things that exist."""
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in _of_kind("ConfigMap")}
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in _of_kind("Secret")}
    claims = {doc["metadata"]["name"] for doc in _of_kind("PersistentVolumeClaim")}
    for workload, pod in _pod_templates():
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, workload
                else:
                    assert source["secretRef"]["name"] in secrets, workload
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (workload, ref)
            port_names = {port["name"] for port in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                check = container.get(probe, {})
                port = (check.get("httpGet") or check.get("tcpSocket") or {}).get("port")
                assert port is None or isinstance(port, int) or port in port_names, (workload, probe, port)
            for mount in container.get("volumeMounts", []):
                volume = volumes.get(mount["name"])
                assert volume is not None or mount["name"] in _claim_templates(workload), (workload, mount)
                if volume and "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps
                if volume and "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
    for service in _of_kind("Service"):
        selector = service["spec"].get("selector")
        if selector:  # every selector matches a workload's pods
            assert any(selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
                       for doc in _of_kind("Deployment") + _of_kind("StatefulSet")), service["metadata"]["name"]


def _claim_templates(workload: str) -> set[str]:
    return {template["metadata"]["name"] for doc in _of_kind("StatefulSet") if doc["metadata"]["name"] == workload
            for template in doc["spec"].get("volumeClaimTemplates", [])}


def test_k8s_workloads_are_hardened_and_bounded() -> None:
    for workload, pod in _pod_templates():
        assert pod["securityContext"]["runAsNonRoot"] is True, workload
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", workload
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, workload
            assert context["readOnlyRootFilesystem"] is True, workload
            assert context["capabilities"]["drop"] == ["ALL"], workload
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (workload, bound)
    budgets = [doc["spec"]["selector"]["matchLabels"] for doc in _of_kind("PodDisruptionBudget")]
    for deployment in _of_kind("Deployment") + _of_kind("StatefulSet"):
        if deployment["spec"]["replicas"] > 1:  # what runs several copies keeps one through a node drain
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert any(budget.items() <= labels.items() for budget in budgets), deployment["metadata"]["name"]


def test_k8s_api_probes_use_the_health_endpoints() -> None:
    api = next(c for name, c in _pacs_containers() if c["args"] == ["api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    minio = next(pod for name, pod in _pod_templates() if name == "minio")
    assert minio["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert any("minio-{0...3}" in arg for arg in minio["containers"][0]["args"])
    assert next(doc for doc in _of_kind("StatefulSet") if doc["metadata"]["name"] == "minio")["spec"]["replicas"] == 4


def test_k8s_trusts_proxies_only_behind_a_network_policy() -> None:
    config = next(doc for doc in _of_kind("ConfigMap") if doc["metadata"]["name"] == "pacs-config")["data"]
    assert "PACS_TRUSTED_PROXIES" not in config  # not inherited by every process
    trusted = {name: json.loads(var["value"]) for name, c in _pacs_containers() for var in c.get("env", [])
               if var["name"] == "PACS_TRUSTED_PROXIES"}
    assert trusted["pacs-scp"] == []  # modalities arrive with their own address (externalTrafficPolicy: Local)
    assert set(trusted) == {"pacs-scp", "pacs-api"}
    # the api believes the pod network: only the ingress controller and Prometheus may reach its pods
    api_labels = next(doc for doc in _of_kind("Deployment")
                      if doc["metadata"]["name"] == "pacs-api")["spec"]["template"]["metadata"]["labels"]
    policies = [doc["spec"] for doc in _of_kind("NetworkPolicy")
                if doc["spec"]["podSelector"]["matchLabels"].items() <= api_labels.items()]
    assert len(policies) == 1 and policies[0]["policyTypes"] == ["Ingress"]
    peers = [peer for rule in policies[0]["ingress"] for peer in rule["from"]]
    assert peers and all(set(peer) == {"namespaceSelector", "podSelector"} and peer["podSelector"]["matchLabels"]
                         for peer in peers)  # named pods of named namespaces: no address range, no "anyone"
    assert [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in peers] == [
        "ingress-nginx", "monitoring"]


# -- systemd ------------------------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"
PACS_BINARY = "/opt/pacs/bin/pacs"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section → key → values (a key may repeat, as Environment= does)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


@functools.cache
def _units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {path.name: _unit(path) for path in sorted(SYSTEMD.glob("*.service"))}


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze (Debian package systemd, scripts/bootstrap.sh) is needed to check deploy/systemd"
    # verify insists that ExecStart's program exists: use this checkout's pacs in place of the install path
    pacs = Path(sys.executable).with_name("pacs")
    assert pacs.exists()
    for path in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]:
        (tmp_path / path.name).write_text(path.read_text().replace(PACS_BINARY, str(pacs)))
    units = sorted(str(p) for p in tmp_path.iterdir())
    assert len(units) == 6
    result = subprocess.run([tool, "verify", *units], capture_output=True, text=True, timeout=60)
    # unknown keys and bad values are only warnings (exit status 0): any output is a failure
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_systemd_units_run_as_pacs_hardened_with_real_settings() -> None:
    units = _units()
    assert set(units) == {"pacs-serve.service", "pacs-scp.service", "pacs-api.service", "pacs-worker.service",
                          "pacs-hl7.service"}
    metrics_ports = []
    for name, unit in units.items():
        service = unit["Service"]
        assert service["User"] == ["pacs"] and service["EnvironmentFile"] == ["/etc/pacs/pacs.env"], name
        assert service["ExecStart"][0].split()[0] == PACS_BINARY, name
        assert service["ProtectSystem"] == ["strict"] and service["NoNewPrivileges"] == ["yes"], name
        assert service["Restart"] == ["on-failure"], name
        # systemd unquotes Environment= lines as a shell would (a JSON value is single-quoted whole)
        env = dict(item.split("=", 1) for value in service.get("Environment", []) for item in shlex.split(value))
        assert set(env) <= SETTING_NAMES, name
        # the data folder is the one writable place
        assert service["ReadWritePaths"] == [env["PACS_DATA_DIR"]] == ["/var/lib/pacs"], name
        if "PACS_METRICS_PORT" in env:
            metrics_ports.append(env["PACS_METRICS_PORT"])
        wanted_by = unit["Install"]["WantedBy"]
        assert wanted_by == (["multi-user.target"] if name == "pacs-serve.service" else ["pacs.target"]), name
    assert len(metrics_ports) == len(set(metrics_ports)) == 3  # scp, worker, hl7 share a host: one port each


def _env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines (with ``commented``, also ``#KEY=VALUE`` examples), quotes removed as systemd does."""
    out = {}
    for line in path.read_text().splitlines():
        if commented:
            line = line.removeprefix("#")
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            value = match[2]
            out[match[1]] = value[1:-1] if value[:1] in "'\"" and value[-1:] == value[:1] else value
    return out


def test_systemd_environment_file_is_accepted_by_settings() -> None:
    example = SYSTEMD / "pacs.env.example"
    names = set(_env_file(example, commented=True))
    assert {"PACS_DATABASE_URL", "PACS_STORAGE_URL", "PACS_BROKER_URL", "PACS_AUTH_SECRET"} <= names
    assert names - SETTING_NAMES == set()
    values = _env_file(example, commented=True)
    settings = operator_settings(values)
    assert "target_session_attrs=read-write" in settings.effective_database_url


def test_systemd_api_trusts_its_local_proxy_alone() -> None:
    trusted = {name: json.loads(item.split("=", 1)[1]) for name, unit in _units().items()
               for value in unit["Service"].get("Environment", []) for item in shlex.split(value)
               if item.startswith("PACS_TRUSTED_PROXIES=")}
    assert trusted == {"pacs-api.service": ["127.0.0.1", "::1"]}
    # the environment file would override the unit's (EnvironmentFile= wins over Environment=): an example only
    example = SYSTEMD / "pacs.env.example"
    assert "PACS_TRUSTED_PROXIES" not in _env_file(example)
    balancers = json.loads(_env_file(example, commented=True)["PACS_TRUSTED_PROXIES"])
    assert balancers and all(ipaddress.ip_network(address).num_addresses == 1 for address in balancers)


# -- every command deploy/ runs is a real pacs subcommand -----------------------------------------------------

def _deploy_commands(compose: dict) -> dict[str, list[str]]:
    commands = {f"systemd/{name}": shlex.split(unit["Service"]["ExecStart"][0])[1:]
                for name, unit in _units().items()}
    commands |= {f"k8s/{name}": container["args"] for name, container in _pacs_containers()}
    commands |= {f"compose/{name}": service["command"] for name, service in compose["services"].items()
                 if service.get("image") == "filmless-pacs:latest"}
    return commands


def test_deploy_runs_only_real_pacs_commands(compose: dict) -> None:
    from typer.testing import CliRunner

    from pacs.cli.main import app

    commands = _deploy_commands(compose)
    assert len(commands) >= 14
    umask = os.umask(0o022)  # the CLI's callback narrows the umask of this (the test) process
    os.umask(umask)
    unique: dict[tuple[str, ...], str] = {}
    for where, args in commands.items():
        unique.setdefault(tuple(args), where)
    try:
        for args, where in unique.items():  # ~0.2 s each
            result = CliRunner().invoke(app, [*args, "--help"])
            assert result.exit_code == 0, f"{where}: `pacs {' '.join(args)}` is not a pacs command: {result.output}"
    finally:
        os.umask(umask)


# -- deploy/multi-host.md lists every port and every secret -----------------------------------------------------

GUIDE = DEPLOY / "multi-host.md"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_USER$|_KEY$")


def _guide_table(section: str) -> list[list[str]]:
    """The rows (cells) of the first table under ``## section`` of the guide, header excluded."""
    text = GUIDE.read_text()
    assert f"\n## {section}\n" in text, f"multi-host.md has no section {section!r}"
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def _ports_in(text: str) -> set[int]:
    """Port numbers named as ``host:PORT`` / ``:PORT`` in a value (URLs, binds, listen addresses)."""
    return {int(port) for port in re.findall(r"(?<![\w.])(?:[\w.{}\-]*|\*):(\d{2,5})(?![\d.])", text)}


def _deploy_ports(compose: dict) -> dict[int, str]:
    ports: dict[int, str] = {}

    def add(found: Any, where: str) -> None:
        for port in [found] if isinstance(found, int) else found:
            ports.setdefault(int(port), where)

    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            add([mapping["target"], mapping["published"]], f"compose {name} ports")
        for var, value in (service.get("environment") or {}).items():
            add(_ports_in(str(value)), f"compose {name} {var}")
            if var.endswith("_PORT"):
                add(int(value), f"compose {name} {var}")
        command = service.get("command") or []
        add(_ports_in(" ".join(command) if isinstance(command, list) else command), f"compose {name} command")
        add(_ports_in(" ".join(map(str, (service.get("healthcheck") or {}).get("test", [])))),
            f"compose {name} healthcheck")
    for cfg in ("minio-lb.cfg", "haproxy.cfg"):
        for line in (DEPLOY / cfg).read_text().splitlines():
            if line.split()[:1] in (["bind"], ["server"], ["server-template"]):
                add(_ports_in(line), cfg)
    for filename, doc in _k8s_documents():
        where = f"k8s/{filename} {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Service":
            for port in doc["spec"].get("ports", []):
                add([p for p in (port["port"], port.get("targetPort")) if isinstance(p, int)], where)
        if doc["kind"] in ("Secret", "ConfigMap"):
            for value in (doc.get("stringData") or doc.get("data") or {}).values():
                add(_ports_in(value), where)
    for workload, pod in _pod_templates():
        for container in pod["containers"]:
            add([port["containerPort"] for port in container.get("ports", [])], f"k8s {workload}")
            add(_ports_in(" ".join(container.get("args", []))), f"k8s {workload} args")
            for var in container.get("env", []):
                if var["name"].endswith("_PORT"):
                    add(int(var["value"]), f"k8s {workload} {var['name']}")
    for name, unit in _units().items():
        for value in unit["Service"].get("Environment", []):
            var, _, number = value.partition("=")
            if var.endswith("_PORT"):
                add(int(number), f"systemd/{name}")
    # the listeners the processes open by default (DICOM, DICOM TLS, HTTP, HL7)
    defaults = Settings()
    add([defaults.dicom_port, defaults.dicom_tls_port, defaults.http_port, defaults.hl7_port], "settings defaults")
    return ports


def test_guide_firewall_table_lists_every_port(compose: dict) -> None:
    ports = _deploy_ports(compose)
    assert {11112, 2762, 8000, 2575, 5432, 6379, 9000, 9001, 9102} <= set(ports)
    listed: set[int] = set()
    for row in _guide_table("Firewall"):
        assert len(row) == 4 and ("→" in row[0] or "↔" in row[0]), row  # source → destination | port | proto | why
        listed |= {int(number) for number in re.findall(r"\b\d{2,5}\b", row[1])}
    missing = {port: where for port, where in ports.items() if port not in listed}
    assert not missing, f"ports used by deploy/ but missing from multi-host.md's firewall table: {missing}"


def test_guide_secrets_table_lists_every_secret() -> None:
    secrets = {name: "k8s/secret.yaml" for name in _of_kind("Secret")[0]["stringData"]}
    for path in (DEPLOY / "env.example", SYSTEMD / "pacs.env.example"):
        secrets |= {name: path.name for name in _env_file(path, commented=True)
                    if SECRET_NAME.search(name) or name in ("PACS_DATABASE_URL", "PACS_STORAGE_URL",
                                                            "PACS_BROKER_URL")}
    # settings that hold a credential or name a key file are secrets wherever they are set
    secrets |= {f"PACS_{name.upper()}": "settings" for name in Settings.model_fields
                if re.search(r"secret|password|key_file", name)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "REDIS_PASSWORD", "PACS_AUTH_SECRET",
            "PACS_TLS_KEY_FILE"} <= set(secrets)
    listed = {name for row in _guide_table("Secrets") for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0])}
    missing = {name: where for name, where in secrets.items() if name not in listed}
    assert not missing, f"secrets of deploy/ missing from multi-host.md's secrets table: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_deploy_guides_link_to_files_and_sections_that_exist() -> None:
    for guide in sorted(DEPLOY.glob("*.md")):
        for target in re.findall(r"\]\(([^)\s]+)\)", guide.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (guide.parent / path) if path else guide
            assert linked.exists(), f"{guide.name} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{guide.name} links to {target}: no such section"
