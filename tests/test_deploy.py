"""The deployment files are well-formed and name commands and settings that exist.

No docker engine or cluster here: the files are parsed and checked against the real code
(the ``stylequeue`` argparse parser, :class:`Settings`, the Celery app's queue layout).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import re
import shlex
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from stylequeue.cli import build_parser
from stylequeue.settings import ENV_PREFIX, Settings
from stylequeue.tasks.app import DEFAULT_PRIORITY, make_app
from stylequeue.monitoring.queues import queue_keys

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.worker"]
# STYLEQUEUE_* variables that are not Settings fields but are read by the code on purpose.
NON_FIELD_ENV = {ENV_PREFIX + "CONFIG", ENV_PREFIX + "GPU_COUNT"}
SECRET_WORDS = ("PASSWORD", "SECRET", "BASIC_AUTH", "ACCESS_KEY")
PLACEHOLDER = re.compile(r"CHANGE_ME|\$\{[A-Z0-9_]+(:?[?-][^}]*)?\}")


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            yield path, doc


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in k8s_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return load_docs(COMPOSE)[0]


def our_services() -> dict[str, dict[str, Any]]:
    """Compose services that run the stylequeue image (not redis, minio, mc)."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if str(svc.get("image", "")).startswith("stylequeue")
    }


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def assert_real_command(argv: list[str], where: str) -> None:
    """``argv`` (after the ``stylequeue`` entrypoint) parses with the real CLI parser."""
    assert argv and argv[0] in subcommands(), f"{where}: {argv!r} names no stylequeue subcommand"
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown option
        pytest.fail(f"{where}: `stylequeue {shlex.join(argv)}` is rejected by the CLI ({exc})")


def duration_s(value: str | int) -> float:
    """Compose durations: ``3660s``, ``1h2m``, or a bare number of seconds."""
    if isinstance(value, int):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts, f"cannot read duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def longest_job_s() -> int:
    """The job time limit the deployment files set, or the default if they set none."""
    limits = [Settings().job_time_limit]
    for path in [COMPOSE, K8S / "configmap.yaml"]:
        limits += [int(v) for v in re.findall(r"STYLEQUEUE_JOB_TIME_LIMIT:\s*\"?(\d+)", path.read_text())]
    return max(limits)


# ---- files parse ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    if path.parent == K8S and path.name != "kustomization.yaml":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a k8s object"


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    listed = set(load_docs(K8S / "kustomization.yaml")[0]["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk


def test_healthcheck_script_is_valid_shell() -> None:
    subprocess.run(["sh", "-n", str(DEPLOY / "healthcheck.sh")], check=True)


# ---- commands and settings exist --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(our_services()))
def test_compose_commands_are_real_subcommands(name: str) -> None:
    assert_real_command(list(our_services()[name]["command"]), f"compose service {name}")


def test_k8s_container_args_are_real_subcommands() -> None:
    deployments = [d for _, d in k8s_objects() if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} >= {
        "gpu-worker", "light-worker", "beat", "flower", "metrics"
    }
    for dep in deployments:
        assert_real_command(list(container(dep)["args"]), f"k8s Deployment {dep['metadata']['name']}")


def test_every_stylequeue_env_var_is_a_setting() -> None:
    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    named: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for var in re.findall(r"\bSTYLEQUEUE_[A-Z0-9_]+", path.read_text()):
                named.setdefault(var, set()).add(str(path.relative_to(ROOT)))
    assert named, "deploy/ names no STYLEQUEUE_* settings at all"
    unknown = {var: files for var, files in named.items() if var not in fields | NON_FIELD_ENV}
    assert not unknown, f"STYLEQUEUE_* names that are not Settings fields: {unknown}"


def test_deployment_selectors_match_their_pods_and_config_exists() -> None:
    secret_name = load_docs(K8S / "secret.example.yaml")[0]["metadata"]["name"]
    config_name = k8s_object("ConfigMap", "stylequeue-config")["metadata"]["name"]
    for _, dep in k8s_objects():
        if dep["kind"] != "Deployment":
            continue
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for ref in container(dep).get("envFrom", []):
            name = (ref.get("configMapRef") or ref.get("secretRef"))["name"]
            assert name in (config_name, secret_name), f"{dep['metadata']['name']} reads {name}"


# ---- GPU workers: GPUs, shutdown, scaling -----------------------------------------------------


def test_gpu_worker_reserves_a_gpu_in_compose_and_k8s() -> None:
    svc = compose()["services"]["gpu-worker"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["command"][:1] == ["worker"] and "gpu" in svc["command"]
    limits = container(k8s_object("Deployment", "gpu-worker"))["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


def test_workers_get_longer_than_a_job_to_stop() -> None:
    longest = longest_job_s()
    for name, svc in compose()["services"].items():
        if "worker" in name:
            assert duration_s(svc["stop_grace_period"]) > longest, f"compose {name}"
            assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    for name in ("gpu-worker", "light-worker"):
        spec = k8s_object("Deployment", name)["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > longest, f"k8s {name}"


def test_beat_is_a_singleton() -> None:
    beat = k8s_object("Deployment", "beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    assert "deploy" not in compose()["services"]["beat"]  # no compose replicas either


def test_keda_scales_the_gpu_worker_on_the_real_gpu_queue_keys() -> None:
    obj = k8s_object("ScaledObject", "gpu-worker")
    spec = obj["spec"]
    assert spec["scaleTargetRef"]["name"] == "gpu-worker"
    assert spec["cooldownPeriod"] > longest_job_s()
    # The deployment's broker is Redis: the key layout is the one the app sets up for Redis.
    settings = Settings(broker_url="redis://redis:6379/0")
    keys = queue_keys(make_app(settings).conf.broker_transport_options)
    real_lists = {keys.list_key(settings.gpu_queue, step) for step in keys.priority_steps}
    lists = [t["metadata"]["listName"] for t in spec["triggers"] if t["type"] == "redis"]
    assert settings.gpu_queue in lists
    assert set(lists) <= real_lists, f"KEDA watches lists kombu never writes: {set(lists) - real_lists}"
    # The default priority's list is where most jobs wait; a trigger must see it (kombu rounds a
    # priority down to its step: Channel.priority).
    step = keys.priority_steps[bisect.bisect(keys.priority_steps, DEFAULT_PRIORITY) - 1]
    assert keys.list_key(settings.gpu_queue, step) in lists
    queries = [t["metadata"]["query"] for t in spec["triggers"] if t["type"] == "prometheus"]
    assert any(f'stylequeue_queue_length{{queue="{settings.gpu_queue}"}}' in q for q in queries)


# ---- Flower and metrics: auth and network -----------------------------------------------------


def test_flower_has_basic_auth_everywhere() -> None:
    env = compose()["services"]["flower"]["environment"]
    assert PLACEHOLDER.fullmatch(env["STYLEQUEUE_FLOWER_BASIC_AUTH"]), "compose Flower auth is not from .env"
    assert ":?" in env["STYLEQUEUE_FLOWER_BASIC_AUTH"], "compose must refuse to start without auth"
    k8s_env = {e["name"]: e for e in container(k8s_object("Deployment", "flower"))["env"]}
    ref = k8s_env["STYLEQUEUE_FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    secret = load_docs(K8S / "secret.example.yaml")[0]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not re.search(r"INSECURE_NO_AUTH\W+(1|true|yes|on)", path.read_text(), re.I), path


def test_flower_and_metrics_are_cluster_internal_and_network_restricted() -> None:
    for name in ("flower", "metrics"):
        assert k8s_object("Service", name)["spec"].get("type", "ClusterIP") == "ClusterIP"
    for name in ("flower", "metrics"):
        for port in compose()["services"][name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"compose {name} publishes {port} publicly"
    policy = k8s_object("NetworkPolicy", "monitoring-only")["spec"]
    selected = policy["podSelector"]["matchExpressions"][0]["values"]
    assert {"flower", "metrics"} <= set(selected)
    sources = [src for rule in policy["ingress"] for src in rule["from"]]
    assert sources and all(
        src["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
        for src in sources
    )


# ---- no secrets committed ---------------------------------------------------------------------


def secret_values() -> Iterator[tuple[str, str]]:
    """(where, value) for every secret-looking key in compose, the Secret and .env.example."""
    for name, svc in compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if any(w in key for w in SECRET_WORDS):
                yield f"compose {name} {key}", str(value)
    for key, value in load_docs(K8S / "secret.example.yaml")[0]["stringData"].items():
        yield f"secret.example.yaml {key}", str(value)
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#") and any(w in key for w in SECRET_WORDS):
            yield f".env.example {key}", value


def test_no_real_secrets_committed() -> None:
    checked = list(secret_values())
    assert len(checked) >= 5
    for where, value in checked:
        assert PLACEHOLDER.search(value), f"{where} holds a value that is not a placeholder: {value!r}"
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", text), path
            assert not re.search(r"redis://[^/\s]*:[^@/\s]+@", text), f"{path}: password in a URL"
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert ".env" in ignored


# ---- Dockerfiles ------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is valid YAML
    assert isinstance(value, list), f"use the exec form (a JSON array), got {args!r}"
    return value


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_well_formed(path: Path) -> None:
    steps = dockerfile_instructions(path)
    words = [w for w, _ in steps]
    assert words[0] == "FROM"
    assert {"COPY", "RUN", "USER", "ENTRYPOINT", "CMD", "STOPSIGNAL"} <= set(words)
    args = dict(steps)  # the last of each instruction wins, as in docker
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert args["USER"] not in ("root", "0")
    assert exec_form(args["ENTRYPOINT"]) == ["stylequeue"]
    assert_real_command(exec_form(args["CMD"]), path.name)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_and_are_not_ignored(path: Path) -> None:
    ignore = [line.strip() for line in Path(f"{path}.dockerignore").read_text().splitlines()]
    patterns = [p for p in ignore if p and not p.startswith("#")]
    for word, args in dockerfile_instructions(path):
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            matches = list(ROOT.glob(source))
            if "*" not in source:
                assert matches, f"{path.name}: COPY {source}: no such file in the repository"
            for match in matches:
                rel = str(match.relative_to(ROOT))
                included = False
                for pattern in patterns:  # .dockerignore: the last matching pattern wins
                    negated = pattern.startswith("!")
                    pat = pattern.lstrip("!").rstrip("/")
                    if fnmatch(rel, pat) or rel.startswith(pat + "/"):
                        included = negated
                assert included, f"{path.name}: COPY {rel} is excluded by its .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_gets_every_file_pip_install_needs(path: Path) -> None:
    """``pip install .`` reads the readme that pyproject.toml names: it must exist and be copied."""
    import tomllib

    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme is None:
        return
    sources = [src for word, args in dockerfile_instructions(path) if word == "COPY"
               for src in args.split()[:-1]]
    assert any(fnmatch(readme, src) for src in sources), f"{path.name} does not COPY {readme}"
    assert (ROOT / readme).is_file(), f"pyproject.toml names {readme}, which does not exist"


def test_worker_image_has_a_healthcheck_that_pings_its_gpu_worker() -> None:
    args = dict(dockerfile_instructions(DEPLOY / "Dockerfile.worker"))
    assert "stylequeue-healthcheck" in args["HEALTHCHECK"]
    assert "HEALTHCHECK_NODES=gpu0" in args["ENV"]


# ---- Prometheus and Grafana (the fleet dashboard) ---------------------------------------------

GRAFANA = DEPLOY / "grafana"


def scrape_targets() -> dict[str, list[tuple[str, int]]]:
    """deploy/prometheus.yml's jobs -> (host, port) of each target, static or found by DNS."""
    config = load_docs(DEPLOY / "prometheus.yml")[0]
    jobs: dict[str, list[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        targets = [t.rsplit(":", 1) for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [(name, c["port"]) for c in job.get("dns_sd_configs", []) for name in c["names"]]
        jobs[job["job_name"]] = [(host, int(port)) for host, port in targets]
    return jobs


# The setting that names the port each subcommand serves metrics on.
METRICS_PORT_OF = {"flower": "flower_port", "metrics": "metrics_port", "worker": "worker_metrics_port"}


def metrics_port(service: str) -> int:
    """The port a compose service of ours serves /metrics on (0: none), as its settings say."""
    svc = compose()["services"][service]
    field = METRICS_PORT_OF.get(svc.get("command", [""])[0])
    if field is None:
        return 0
    return int(svc.get("environment", {}).get(ENV_PREFIX + field.upper(), getattr(Settings(), field)))


def test_prometheus_scrapes_every_exporter_at_its_compose_service_and_port() -> None:
    jobs = scrape_targets()
    scraped = {target for targets in jobs.values() for target in targets}
    for host, port in scraped:
        assert host in compose()["services"], f"prometheus.yml scrapes {host}, not a compose service"
        assert port == metrics_port(host) != 0, f"prometheus.yml scrapes {host}:{port}; it serves {metrics_port(host)}"
    # Every exporter is scraped: the queue exporter, Flower, and each worker launcher.
    assert {("metrics", 9540), ("flower", 5555), ("gpu-worker", 9541), ("light-worker", 9541)} <= scraped
    prometheus = compose()["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {src: dest.removesuffix(":ro") for src, dest in (v.split(":", 1) for v in grafana["volumes"])}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = load_docs(GRAFANA / "provisioning" / "dashboards" / "stylequeue.yml")[0]["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    datasource = load_docs(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"][0]
    host, port = datasource["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and f"127.0.0.1:{port}:{port}" in compose()["services"]["prometheus"]["ports"]
    import json

    dashboard = json.loads((GRAFANA / "dashboards" / "stylequeue.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == datasource["uid"] for p in panels)
    assert all(t["datasource"]["uid"] == datasource["uid"] for p in panels for t in p["targets"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    password = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert PLACEHOLDER.fullmatch(password) and ":?" in password, "Grafana's password must come from deploy/.env"
    assert "GRAFANA_ADMIN_PASSWORD=" in (DEPLOY / ".env.example").read_text()


def test_prometheus_and_grafana_publish_on_loopback_only() -> None:
    for name in ("prometheus", "grafana"):
        ports = compose()["services"][name]["ports"]
        assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), f"compose {name}: {ports}"
