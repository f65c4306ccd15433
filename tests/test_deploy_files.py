"""The deploy files agree with the code: ports, probe paths, user, volumes and config keys.

No container engine here, so nothing is built or run: the Dockerfile, compose.yaml and the
Kubernetes manifests are read as text / YAML and checked against the settings the real loader
builds from the configurations they ship, and against the endpoints the code serves.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ServerSettings, Settings, load_settings_text

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DUMMY_ENV = {"REDIS_PASSWORD": "z", "CLOUD_TOKEN": "x"}
LABELS = {"app.kubernetes.io/name": "countersign", "app.kubernetes.io/component": "proxy"}
AUDIT_DIR = "/var/log/countersign"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def served_paths() -> set[str]:
    """The paths proxy/server/internal.py registers: `PREFIX + "name"` in a route decorator."""
    source = (ROOT / "proxy" / "server" / "internal.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    prefix = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "PREFIX" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )
    paths = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "route")
            and node.args
        ):
            arg = node.args[-1]
            if (
                isinstance(arg, ast.BinOp)
                and isinstance(arg.left, ast.Name)
                and arg.left.id == "PREFIX"
                and isinstance(arg.right, ast.Constant)
                and "{" not in arg.right.value
            ):
                paths.add(prefix + arg.right.value)
    return paths


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def load_manifests(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in load_manifests(path.name)
        if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def configmap_settings() -> tuple[str, Settings]:
    text = one("ConfigMap", "countersign")["data"]["countersign.yaml"]
    return text, load_settings_text(text, "configmap.yaml:countersign.yaml", env=DUMMY_ENV)


def deploy_settings() -> Settings:
    text = (DEPLOY / "countersign.yaml").read_text(encoding="utf-8")
    return load_settings_text(text, "deploy/countersign.yaml", env=DUMMY_ENV)


def container() -> dict[str, Any]:
    containers = one("Deployment", "countersign")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "countersign")


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_is_pinned() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    froms = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert froms
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        # python:3.11.<patch>-slim-<debian>, optionally @sha256:<64 hex>; never latest or 3.11
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image


def test_dockerfile_installs_dependencies_before_copying_the_code() -> None:
    instructions = dockerfile_instructions()
    steps = [(w, r) for w, r in instructions if w in ("COPY", "RUN")]
    lock_copy = next(
        i for i, (w, r) in enumerate(steps) if w == "COPY" and "requirements.lock" in r
    )
    deps = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "-c requirements.lock" in r)
    code_copy = next(i for i, (w, r) in enumerate(steps) if w == "COPY" and "proxy" in r.split())
    assert lock_copy < deps < code_copy
    assert "proxy" not in steps[lock_copy][1].split()
    # the code's own install must not re-resolve the dependencies
    assert any(w == "RUN" and "--no-deps" in r for w, r in steps[code_copy:])


def test_dockerfile_user_is_not_root() -> None:
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the Deployment runs as the same uid
    pod = one("Deployment", "countersign")["spec"]["template"]["spec"]
    if user.isdigit():
        assert pod["securityContext"]["runAsUser"] == int(user)


def test_dockerfile_healthcheck_hits_a_served_path_on_the_admin_port() -> None:
    checks = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    urls = re.findall(r"https?://[^'\" ]+", checks[0])
    assert urls
    for url in urls:
        path = "/" + url.split("/", 3)[3]
        assert path in served_paths(), path
        assert path.endswith("/healthz")
        for settings in (deploy_settings(), configmap_settings()[1]):
            assert settings.server.admin_listen is not None
            assert f":{port_of(settings.server.admin_listen)}/" in url
    assert "curl" not in checks[0] and "urllib" in checks[0]


def test_dockerfile_exposes_the_configured_ports_and_stops_cleanly() -> None:
    instructions = dockerfile_instructions()
    exposed = {int(p.split("/")[0]) for w, r in instructions if w == "EXPOSE" for p in r.split()}
    for settings in (deploy_settings(), configmap_settings()[1]):
        assert settings.server.admin_listen is not None
        assert exposed == {
            port_of(settings.server.listen),
            port_of(settings.server.admin_listen),
        }
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    assert ("ENTRYPOINT", '["countersign"]') in instructions
    volumes = [r for w, r in instructions if w == "VOLUME"]
    assert any(AUDIT_DIR in v for v in volumes)


def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    lines = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".git", "**/__pycache__", "**/*.pyc", ".mypy_cache", ".ruff_cache"):
        assert entry in lines, entry
    assert "tests" in lines or "tests/idp/node_modules" in lines
    # nothing the Dockerfile copies is ignored
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert source not in lines, source


# --------------------------------------------------------------------------------------------
# The shipped configurations


def test_shipped_configurations_pass_the_real_loader() -> None:
    for settings in (deploy_settings(), configmap_settings()[1]):
        assert settings.store.shared  # two replicas need one store
        assert settings.audit.file is not None
        assert settings.audit.file.startswith(AUDIT_DIR + "/")
        assert settings.server.admin_listen is not None
        assert port_of(settings.server.listen) == 8080
        assert port_of(settings.server.admin_listen) == 9090
        # listening on every interface inside a container (127.0.0.1 would be unreachable)
        assert settings.server.listen.startswith("0.0.0.0:")


def test_shipped_configurations_build_as_countersign_check_builds_them() -> None:
    from proxy.app import check_buildable

    for settings in (deploy_settings(), configmap_settings()[1]):
        problems = check_buildable(settings)
        # the audit directory exists in the image, not necessarily on this machine
        assert [p for p in problems if not p.startswith("audit.file: cannot create")] == []


# --------------------------------------------------------------------------------------------
# compose


def test_compose_runs_two_replicas_with_the_audit_file_on_a_volume() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    replicas = {name: s for name, s in services.items() if "build" in s}
    assert len(replicas) == 2
    assert "redis" in services
    audit_volumes = set()
    for service in replicas.values():
        mounts = [v.split(":") for v in service["volumes"]]
        audit = [m for m in mounts if m[1] == AUDIT_DIR]
        assert len(audit) == 1
        assert audit[0][0] in compose["volumes"]  # a named volume
        audit_volumes.add(audit[0][0])
        assert any(m[1] == "/etc/countersign/countersign.yaml" for m in mounts)
        assert "healthcheck" in service
        health = " ".join(service["healthcheck"]["test"])
        assert any(path in health for path in served_paths())
        assert ":9090/" in health
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace > ServerSettings().drain_seconds
        assert "ports" not in service  # neither port is published by a replica
    assert len(audit_volumes) == 2  # one audit chain per replica
    # only the load balancer publishes, and only the public port, on loopback
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published == ["127.0.0.1:8080:8080"]


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    assert {
        "deployment.yaml",
        "pdb.yaml",
        "service.yaml",
        "configmap.yaml",
        "secret.example.yaml",
        "redis.yaml",
        "kustomization.yaml",
    } <= set(files)
    for name in files:
        docs = load_manifests(name)
        assert docs, name
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), name
    kustomization = load_manifests("kustomization.yaml")[0]
    resources = set(kustomization["resources"])
    # everything but the example Secret (real secrets are created by the operator)
    assert resources == set(files) - {"kustomization.yaml", "secret.example.yaml"}


def test_deployment_probes_and_ports_match_the_config_and_the_code() -> None:
    _, settings = configmap_settings()
    assert settings.server.admin_listen is not None
    admin_port = port_of(settings.server.admin_listen)
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == port_of(settings.server.listen)
    assert ports["admin"] == admin_port
    served = served_paths()
    probes = {k: c[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c}
    assert {"readinessProbe", "livenessProbe"} <= set(probes)
    for kind, probe in probes.items():
        http = probe["httpGet"]
        assert http["path"] in served, (kind, http["path"])
        port = http["port"]
        assert (ports[port] if isinstance(port, str) else port) == admin_port, kind
    assert probes["readinessProbe"]["httpGet"]["path"].endswith("/readyz")
    assert probes["livenessProbe"]["httpGet"]["path"].endswith("/healthz")


def test_deployment_is_non_root_read_only_with_a_writable_audit_volume() -> None:
    deployment = one("Deployment", "countersign")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    c = container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "ALL" in c["securityContext"]["capabilities"]["drop"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    _, settings = configmap_settings()
    assert settings.audit.file is not None
    audit_mount = mounts[str(Path(settings.audit.file).parent)]
    assert not audit_mount.get("readOnly", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "configMap" not in volumes[audit_mount["name"]]
    config_mount = mounts["/etc/countersign"]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "countersign"
    assert c["args"] == ["run", "-c", "/etc/countersign/countersign.yaml"]


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    pod = one("Deployment", "countersign")["spec"]["template"]["spec"]
    _, settings = configmap_settings()
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop > 0
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > ServerSettings().drain_seconds
    assert grace > pre_stop + settings.server.drain_seconds


def test_pdb_and_services_select_the_deployment() -> None:
    deployment = one("Deployment", "countersign")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= labels.items()
    pdb = one("PodDisruptionBudget", "countersign")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    _, settings = configmap_settings()
    assert settings.server.admin_listen is not None
    public = one("Service", "countersign")
    assert public["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in public["spec"]["ports"]] == [(8080, "http")]
    metrics = one("Service", "countersign-metrics")
    assert metrics["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(9090, "admin")]
    annotations = metrics["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in served_paths()
    assert int(annotations["prometheus.io/port"]) == port_of(settings.server.admin_listen)


def test_secrets_referenced_by_the_config_come_from_the_example_secret() -> None:
    text, _ = configmap_settings()
    needed = set(ENV_REF.findall(text))
    env = {e["name"]: e for e in container()["env"]}
    assert needed <= set(env)
    secret = one("Secret", "countersign")
    for name in needed:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "countersign"
        assert ref["key"] in secret["stringData"]


def test_the_example_secret_holds_only_placeholders() -> None:
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    secret = one("Secret", "countersign")
    assert "data" not in secret  # base64 would hide what is in it
    assert secret["stringData"]
    for key, value in secret["stringData"].items():
        assert value == "REPLACE_ME", key
    for pattern in (
        r"xox[abpr]-[0-9A-Za-z-]{10,}",
        r"xapp-[0-9A-Za-z-]{10,}",
        r"AKIA[0-9A-Z]{16}",
        r"gh[pousr]_[0-9A-Za-z]{20,}",
        r"cs_[0-9A-Za-z_-]{16,}",
        r"-----BEGIN",
        r"[0-9a-f]{32,}",
        r"[A-Za-z0-9+/]{40,}={0,2}",
    ):
        assert not re.search(pattern, text), pattern


def test_redis_keeps_approvals_across_restarts() -> None:
    statefulset = one("StatefulSet", "redis")
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" in args
    assert statefulset["spec"]["volumeClaimTemplates"]
    assert any(m["mountPath"] == "/data" for m in redis["volumeMounts"])
    service = one("Service", "redis")
    assert service["spec"]["selector"].items() <= (
        statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    _, settings = configmap_settings()
    assert "@redis:6379/" in settings.store.url
    assert "managed" in (K8S / "redis.yaml").read_text(encoding="utf-8").lower()


@pytest.mark.parametrize("path", ["deploy/compose.yaml", "deploy/slack-app-manifest.yaml"])
def test_other_deploy_yaml_parses(path: str) -> None:
    assert yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def test_the_image_dependencies_are_all_pinned_by_the_lock() -> None:
    """The image installs pyproject's runtime dependencies with `-c requirements.lock`: every one
    of them, and everything they pull in (as installed here), must be pinned there."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version.strip()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    todo = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in lock, f"{req.name} is not pinned in requirements.lock"
        for extra in req.extras or {""}:
            for sub in metadata.requires(req.name) or []:
                sub_req = Requirement(sub)
                if sub_req.marker is None or sub_req.marker.evaluate({"extra": extra}):
                    todo.append(sub_req)


def test_the_teams_app_manifest_names_the_bot_and_its_endpoint() -> None:
    """deploy/teams/: a valid JSON manifest (schema 1.17 or later) whose bot is the app id
    placeholder in the team and group chat scopes, its icons at Teams' sizes, and the
    packaging notes naming the messaging endpoint path the proxy serves."""
    import json
    import struct

    from proxy.teams.app import MESSAGES_PATH

    teams = DEPLOY / "teams"
    manifest = json.loads((teams / "manifest.json").read_text(encoding="utf-8"))
    major, minor = (int(part) for part in manifest["manifestVersion"].split("."))
    assert (major, minor) >= (1, 17)
    assert manifest["manifestVersion"] in manifest["$schema"]
    [bot] = manifest["bots"]
    assert bot["botId"] == manifest["id"] == "{{MICROSOFT_APP_ID}}"
    assert set(bot["scopes"]) == {"team", "groupChat"}
    for name, size in (("color", 192), ("outline", 32)):
        data = (teams / manifest["icons"][name]).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert struct.unpack(">II", data[16:24]) == (size, size), name
    notes = (teams / "README.md").read_text(encoding="utf-8")
    assert "{server.public_url}" + MESSAGES_PATH in notes
    assert "{{MICROSOFT_APP_ID}}" in notes
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MESSAGES_PATH in readme and "deploy/teams/" in readme
