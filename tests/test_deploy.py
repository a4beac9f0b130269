"""The deployment files: docker-compose.yml, deploy/Dockerfile, deploy/proxy/nginx.conf and
deploy/k8s/*.yaml parse and hold to the service's contracts (the `labeler` commands and options
they run, the LABELER_ settings they set, GPUs, shutdown grace, probes, non-root, Redis
persistence, the proxy's bounds). No Docker, no cluster, no network: the files are parsed, not
run."""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "proxy" / "nginx.conf"

# The service's settings (pydantic-settings, prefix LABELER_): nothing else may be set.
SETTINGS = frozenset({
    "LABELER_STORE", "LABELER_DATA_ROOT", "LABELER_CHECKPOINT_ROOT", "LABELER_REDIS_URL",
    "LABELER_API_KEYS", "LABELER_API_KEYS_FILE", "LABELER_VISIBILITY_TIMEOUT",
    "LABELER_TASK_TIME_LIMIT", "LABELER_DEVICE", "LABELER_BATCH_SIZE", "LABELER_PRECISION",
    "LABELER_DECODE_WORKERS", "LABELER_MAX_PIXELS", "LABELER_MAX_BODY_BYTES", "LABELER_LOG_LEVEL",
    "LABELER_HEADER_TIMEOUT", "LABELER_BODY_TIMEOUT", "LABELER_MAX_HEADER_BYTES",
    "LABELER_MAX_CONNECTIONS",
})

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


# -- loading ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def k8s_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append({**doc, "_file": path.name})
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def argv(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def container_argv(container: dict[str, Any]) -> list[str]:
    return argv(container.get("command")) + argv(container.get("args"))


def labeler_commands(services: dict[str, Any], k8s: list[dict[str, Any]]
                     ) -> list[tuple[str, list[str]]]:
    """Every `labeler ...` command line in docker-compose.yml and deploy/k8s, with its source."""
    found = [(f"compose {name}", argv(svc.get("command"))) for name, svc in services.items()]
    for where, pod in pod_specs(k8s):
        found += [(f"{where} {c['name']}", container_argv(c)) for c in containers(pod)]
    return [(where, args) for where, args in found if args[:1] == ["labeler"]]


def option_of(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def seconds(duration: str | int) -> float:
    """A compose duration ("10m", "1m30s", "600s", 600) in seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """Compose's `${VAR}` / `${VAR:-default}` / `${VAR-default}` with no variable set."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def compose_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for a service's short- or long-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = interpolate(volume).split(":")
            mounts[target] = (source, "ro" in ",".join(mode).split(","))
        else:
            mounts[volume["target"]] = (interpolate(volume.get("source", "")),
                                        bool(volume.get("read_only", False)))
    return mounts


def nginx_directives() -> dict[str, list[str]]:
    """deploy/proxy/nginx.conf's simple directives (``name args;``, blocks flattened: the file
    has one server) as name -> the arguments of each occurrence."""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    found: dict[str, list[str]] = {}
    for statement, end in re.findall(r"([^;{}]*)([;{}])", text):
        words = statement.split()
        if words and end == ";":
            found.setdefault(words[0], []).append(" ".join(words[1:]))
    return found


def nginx_bytes(size: str) -> int:
    """An nginx size ("64k", "1m", "512") in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", size).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1 << 20}[unit.lower()]


def gpu_workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items()
            if argv(svc.get("command"))[:2] == ["labeler", "worker"]}


# -- the CLI commands the files run exist (fail until `labeler api` / `worker` are written) ------

def test_cli_has_api_and_worker_commands() -> None:
    from labeler_service.cli import main
    assert "api" in main.commands, "`labeler api` is missing from the CLI"
    assert "worker" in main.commands, "`labeler worker` is missing from the CLI"


def test_cli_options_used_in_deploy_files_exist(services, k8s) -> None:
    from labeler_service.cli import main
    commands = labeler_commands(services, k8s)
    assert {tuple(args[:2]) for _, args in commands} >= {("labeler", "api"),
                                                          ("labeler", "worker")}
    for where, args in commands:
        command = main.commands.get(args[1])
        assert command is not None, f"{where}: `labeler {args[1]}` does not exist"
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        known |= {opt for param in command.params for opt in getattr(param, "secondary_opts", [])}
        for arg in args[2:]:
            if arg.startswith("-"):
                assert arg.split("=", 1)[0] in known, (
                    f"{where}: `labeler {args[1]}` has no option {arg} (has {sorted(known)})")


# -- docker-compose.yml -----------------------------------------------------------------------

def test_compose_redis_is_persistent_noeviction_and_healthchecked(services) -> None:
    redis = services["redis"]
    assert redis["image"] == "${TOKENLABEL_REDIS_IMAGE:-redis:7}"  # the official by default
    command = " ".join(argv(redis["command"]))
    assert "--dir /data" in command  # where the AOF goes, whatever the image's working dir
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(target == "/data" for target in compose_mounts(redis)), "Redis data not on a volume"
    assert "redis-cli" in argv(redis["healthcheck"]["test"])
    assert "ping" in argv(redis["healthcheck"]["test"])


def test_compose_api_service(services) -> None:
    api = services["api"]
    args = argv(api["command"])
    assert args[:2] == ["labeler", "api"]
    assert option_of(args, "--host") == "0.0.0.0"
    port = option_of(args, "--port")
    assert "ports" not in api, "the API is published through the proxy only"
    assert api["build"]["dockerfile"] == "deploy/Dockerfile"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    # The health check needs no curl (the image has none) and asks /healthz.
    test = argv(api["healthcheck"]["test"])
    assert "curl" not in test and "wget" not in test
    assert any(a.startswith("python") for a in test)
    assert any(f"127.0.0.1:{port}/healthz" in a or f"localhost:{port}/healthz" in a for a in test)


def test_compose_publishes_the_api_through_the_proxy(services) -> None:
    """The host reaches the API only through nginx, configured by deploy/proxy/nginx.conf and
    passing requests to the API's port; the official image by default, another where no
    registry is reachable (as for Redis)."""
    proxy = services["proxy"]
    assert proxy["image"] == "${TOKENLABEL_PROXY_IMAGE:-nginx:1.27}"
    assert "deploy/proxy/Dockerfile" in COMPOSE.read_text()
    (published,) = proxy["ports"]
    host, container = interpolate(str(published)).rsplit(":", 1)
    assert host == "8000"
    conf = nginx_directives()
    assert conf["listen"] == [container]
    api_port = option_of(argv(services["api"]["command"]), "--port")
    assert conf["server"] == [f"api:{api_port}"] and conf["proxy_pass"] == ["http://api"]
    assert compose_mounts(proxy)["/etc/nginx/nginx.conf"] == ("./deploy/proxy/nginx.conf", True)
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    assert argv(proxy["entrypoint"])[0] == "nginx" and "daemon off;" in argv(proxy["entrypoint"])
    assert str(proxy["user"]).split(":")[0] not in {"root", "0"}
    assert int(container) > 1024, "a non-root nginx cannot listen below 1024"


def test_the_proxy_bounds_what_a_client_holds_before_the_api_sees_it() -> None:
    """Request heads must arrive within a time, of a bounded size; bodies are bounded as the
    API bounds them; connections per client are limited; idle and stalled clients are cut."""
    from labeler_service.settings import Settings

    conf = nginx_directives()
    assert seconds(conf["client_header_timeout"][0]) <= Settings().header_timeout
    assert seconds(conf["client_body_timeout"][0]) <= 60
    assert seconds(conf["keepalive_timeout"][0]) <= 60
    assert seconds(conf["send_timeout"][0]) <= 60
    count, size = conf["large_client_header_buffers"][0].split()
    assert int(count) * nginx_bytes(size) <= 4 * Settings().max_header_bytes
    assert nginx_bytes(conf["client_max_body_size"][0]) == Settings().max_body_bytes
    (zone,) = conf["limit_conn_zone"]
    assert zone.startswith("$binary_remote_addr zone=per_client:")
    assert conf["limit_conn"] and conf["limit_conn"][0].startswith("per_client ")
    assert all(path.startswith("/tmp/") for name, values in conf.items()
               if name.endswith("_temp_path") or name == "pid" for path in values)


def test_the_offline_proxy_image_is_nginx_from_packages_as_non_root() -> None:
    instructions = dockerfile_instructions(DEPLOY / "proxy" / "Dockerfile")
    assert any(i == "RUN" and "apt-get install" in rest and " nginx" in rest
               for i, rest in instructions)
    (user,) = [rest for i, rest in instructions if i == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    assert ("EXPOSE", "8080") in instructions


def test_compose_api_keys_come_from_a_secret_file(services, compose) -> None:
    api = services["api"]
    env = compose_env(api)
    assert "LABELER_API_KEYS" not in env, "API keys in plain environment: use a secret file"
    (secret,) = api["secrets"]
    if isinstance(secret, str):
        secret = {"source": secret}
    assert "file" in compose["secrets"][secret["source"]]
    target = secret.get("target", secret["source"])
    path = target if target.startswith("/") else f"/run/secrets/{target}"
    assert env["LABELER_API_KEYS_FILE"] == path
    for name in gpu_workers(services):
        assert "LABELER_API_KEYS" not in compose_env(services[name])


def test_compose_mounts(services) -> None:
    for name in ["api", *gpu_workers(services)]:
        mounts = compose_mounts(services[name])
        assert mounts["/data"][1], f"{name}: /data must be read-only"
        assert mounts["/checkpoints"][1], f"{name}: /checkpoints must be read-only"
        assert not mounts["/store"][1], f"{name}: /store must be writable"
        env = compose_env(services[name])
        assert env["LABELER_STORE"] == "/store"
        assert env["LABELER_DATA_ROOT"] == "/data"
        assert env["LABELER_CHECKPOINT_ROOT"] == "/checkpoints"
        assert env["LABELER_REDIS_URL"].startswith("redis://redis:6379/")
    # The store is one volume shared by the API and every worker.
    stores = {compose_mounts(services[name])["/store"][0]
              for name in ["api", *gpu_workers(services)]}
    assert len(stores) == 1, stores


def test_compose_gpu_workers(services) -> None:
    workers = gpu_workers(services)
    assert "worker-gpu0" in workers
    host_gpus = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one GPU per worker"
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert "count" not in device, f"{name}: count and device_ids are mutually exclusive"
        assert [str(i) for i in device["device_ids"]] == device["device_ids"]
        assert len(device["device_ids"]) == 1
        host_gpus += device["device_ids"]
        # The container sees only its reserved GPU, as CUDA device 0.
        assert option_of(argv(worker["command"]), "--gpu") == "0", (
            f"{name}: inside the container the one reserved GPU is device 0")
        assert compose_env(worker)["LABELER_DEVICE"] == "cuda"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(host_gpus) == len(set(host_gpus)), "two workers reserve the same GPU"


def test_compose_workers_shut_down_gracefully_and_have_shm(services) -> None:
    for name, worker in gpu_workers(services).items():
        assert seconds(worker["stop_grace_period"]) >= 300, name
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert re.fullmatch(r"\d+[gG][bB]?", str(worker["shm_size"])), worker["shm_size"]


def test_compose_services_are_not_root(services) -> None:
    for name, svc in services.items():
        assert str(svc.get("user", "")).split(":")[0] not in {"root", "0"}, name


def test_compose_documents_start_and_scaling() -> None:
    header = COMPOSE.read_text().split("\nservices:")[0]
    assert "docker compose up -d --build" in header
    assert "worker-gpu1" in COMPOSE.read_text(), "the commented example for a second GPU"


# -- LABELER_ settings ------------------------------------------------------------------------

def test_only_documented_settings_are_used(services, k8s) -> None:
    """Every LABELER_ name in the deploy files is a setting the service reads."""
    files = [COMPOSE, DOCKERFILE, DEPLOY / "README.md", *k8s_files()]
    for path in files:
        unknown = set(re.findall(r"\bLABELER_[A-Z0-9_]+", path.read_text())) - SETTINGS
        assert not unknown, f"{path.relative_to(ROOT)}: unknown settings {sorted(unknown)}"
    names = {k for svc in services.values() for k in compose_env(svc)}
    for doc in k8s:
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
    for _, pod in pod_specs(k8s):
        names |= {e["name"] for c in containers(pod) for e in c.get("env", [])}
    assert {n for n in names if n.startswith("LABELER_")} <= SETTINGS


def test_settings_constant_names_real_settings() -> None:
    """SETTINGS above is a subset of the service's pydantic Settings fields."""
    from labeler_service.settings import Settings
    fields = {f"LABELER_{name.upper()}" for name in Settings.model_fields}
    assert fields >= SETTINGS, sorted(SETTINGS - fields)


# -- deploy/k8s -------------------------------------------------------------------------------

def test_k8s_manifests_parse(k8s) -> None:
    assert {p.name for p in k8s_files()} >= {
        "configmap.yaml", "secret.yaml", "redis.yaml", "api.yaml", "worker.yaml", "volumes.yaml"}
    for doc in k8s:
        assert doc.get("apiVersion") and doc.get("kind"), doc["_file"]
        assert doc["metadata"]["name"], doc["_file"]
    # `kubectl apply -f deploy/k8s/` reads every file: a kustomization.yaml there would fail it.
    assert all(doc["kind"] != "Kustomization" for doc in k8s)


def test_k8s_manifests_validate_against_the_kubernetes_schemas(k8s) -> None:
    version = kubernetes_validate.latest_version()
    manifests = [{k: v for k, v in doc.items() if k != "_file"} for doc in k8s]
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)  # unknown fields too
    # ... which catches what a typo would do (a positive control).
    worker = copy.deepcopy(find(manifests, "Deployment", "labeler-worker"))
    worker["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, version, strict=True)
    worker["spec"]["replicas"] = 1
    worker["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, version, strict=True)


def test_k8s_worker(k8s) -> None:
    worker = find(k8s, "Deployment", "labeler-worker")
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 300
    (container,) = pod["containers"]
    args = container_argv(container)
    assert args[:2] == ["labeler", "worker"]
    assert option_of(args, "--gpu") == "0", "the pod sees only its GPU, as device 0"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in resources.get("requests", {}), "GPUs go in limits only"
    # No surge pod: it would need a spare GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    # /dev/shm from memory for the DataLoader workers.
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["LABELER_DEVICE"] == "cuda"
    # The manifest explains why there is no preStop hook (Celery's warm shutdown on SIGTERM).
    assert "preStop" in (K8S / worker["_file"]).read_text()


def test_k8s_api(k8s) -> None:
    api = find(k8s, "Deployment", "labeler-api")
    assert api["spec"]["replicas"] >= 2
    (container,) = api["spec"]["template"]["spec"]["containers"]
    args = container_argv(container)
    assert args[:2] == ["labeler", "api"]
    assert option_of(args, "--host") == "0.0.0.0"
    port = int(option_of(args, "--port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports.values()

    def probe_path(probe: str) -> str:
        get = container[probe]["httpGet"]
        assert ports.get(get["port"], get["port"]) == port
        return get["path"]

    assert probe_path("readinessProbe") == "/readyz"
    assert probe_path("livenessProbe") == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # API keys: a Secret mounted as a file, named by LABELER_API_KEYS_FILE.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert "LABELER_API_KEYS" not in env
    keys_file = Path(env["LABELER_API_KEYS_FILE"])
    pod = api["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = find(k8s, "Secret", volume["secret"]["secretName"])
    assert keys_file.name in {**secret.get("data", {}), **secret.get("stringData", {})}
    service = find(k8s, "Service", "labeler-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"][
        "labels"].items()


def test_k8s_example_secret_ships_no_key(k8s) -> None:
    """Applied as is, the example Secret holds only comments: no well-known key, 401 for all."""
    secret = find(k8s, "Secret", "labeler-api-keys")
    lines = secret["stringData"]["api_keys"].splitlines()
    assert all(not line.strip() or line.lstrip().startswith("#") for line in lines), lines


def test_k8s_redis_is_persistent_and_noeviction(k8s) -> None:
    redis = next(d for d in k8s if d["kind"] in ("StatefulSet", "Deployment")
                 and d["metadata"]["name"] == "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    command = " ".join(container_argv(container))
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--bind 0.0.0.0" in command and "--protected-mode no" in command
    assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])
    service = find(k8s, "Service", "redis")
    assert service["spec"]["ports"][0]["port"] == 6379
    config = find(k8s, "ConfigMap", "labeler-config")
    assert config["data"]["LABELER_REDIS_URL"].startswith("redis://redis:6379/")


def test_k8s_volumes(k8s) -> None:
    modes = {d["metadata"]["name"]: d["spec"]["accessModes"]
             for d in k8s if d["kind"] == "PersistentVolumeClaim"}
    assert modes["labeler-store"] == ["ReadWriteMany"], "the store is shared by all pods"
    assert modes["labeler-data"] == ["ReadOnlyMany"]
    assert modes["labeler-checkpoints"] == ["ReadOnlyMany"]
    for name in ("labeler-api", "labeler-worker"):
        pod = find(k8s, "Deployment", name)["spec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts["/store"]["name"]] == "labeler-store"
        assert not mounts["/store"].get("readOnly", False)
        assert claims[mounts["/data"]["name"]] == "labeler-data"
        assert mounts["/data"]["readOnly"] is True
        assert claims[mounts["/checkpoints"]["name"]] == "labeler-checkpoints"
        assert mounts["/checkpoints"]["readOnly"] is True


def test_k8s_references_resolve(k8s) -> None:
    """The ConfigMaps, Secrets, claims and volumes the pods name are defined."""
    defined = {(d["kind"], d["metadata"]["name"]) for d in k8s}
    for doc in k8s:
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in defined, f"{where}: {claim}"
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in defined, where
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in defined, where
        for container in containers(pod):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    name = source["configMapRef"]["name"]
                    assert ("ConfigMap", name) in defined, f"{where}: {name}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
    for service in (d for d in k8s if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in k8s if d["kind"] in WORKLOAD_KINDS), service["metadata"]["name"]


def test_k8s_pods_run_as_non_root(k8s) -> None:
    specs = list(pod_specs(k8s))
    assert len(specs) >= 3
    for where, pod in specs:
        pod_context = pod.get("securityContext", {})
        for container in containers(pod):
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, f"{where} {container['name']}"
            assert context.get("runAsUser", 1) != 0, f"{where} {container['name']}"
            assert context.get("allowPrivilegeEscalation") is False, where


def test_k8s_labeler_pods_use_the_image_user(k8s) -> None:
    for name in ("labeler-api", "labeler-worker"):
        pod = find(k8s, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        # `args` keeps the image's ENTRYPOINT (tini, which forwards SIGTERM).
        assert "command" not in pod["containers"][0]


# -- deploy/Dockerfile and .dockerignore ------------------------------------------------------

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def test_dockerfile_cuda_runtime_base() -> None:
    """The default base is a CUDA runtime; BASE_IMAGE replaces it (a local or mirrored base)."""
    stages: dict[str, str] = {}
    args: dict[str, str] = {}
    final = ""
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            args[name] = default
        if instruction == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            image = stages.get(words[0], words[0])   # FROM an earlier stage: its base image
            if len(words) == 3 and words[1].lower() == "as":
                stages[words[2]] = image
            final = image
    assert "cuda" in final and "runtime" in final, final
    assert "BASE_IMAGE" in args


def test_dockerfile_installs_through_optional_pip_secrets() -> None:
    runs = [rest for instruction, rest in dockerfile_instructions() if instruction == "RUN"
            and "pip-install" in rest]
    assert len(runs) == 2 and all("id=pip_conf" in r and "id=ca_bundle" in r for r in runs)
    script = (ROOT / "deploy" / "pip-install.sh").read_text()
    assert "PIP_CONFIG_FILE=/run/secrets/pip_conf" in script
    assert "PIP_CERT=/run/secrets/ca_bundle" in script


def test_dockerfile_user_and_entrypoint() -> None:
    instructions = dockerfile_instructions()
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0] == "10001"
    assert ("EXPOSE", "8000") in instructions
    assert any(i in ("ENTRYPOINT", "CMD") and "labeler" in rest for i, rest in instructions)
    runs = " ".join(rest for instruction, rest in instructions if instruction == "RUN")
    assert "-c constraints.txt ." in runs


def test_dockerfile_bakes_in_no_secrets() -> None:
    for instruction, rest in dockerfile_instructions():
        if instruction in ("ENV", "ARG"):
            assert not re.search(r"API_KEYS?\b|PASSWORD|SECRET|TOKEN", rest, re.I), rest
        if instruction in ("COPY", "ADD"):
            assert "api_keys" not in rest and ".env" not in rest.split(), rest


def test_dockerignore() -> None:
    entries = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    required = {".venv", "store", "sample", "bench-out", ".git", "data", "checkpoints",
                "api_keys.txt"}
    assert required <= entries, required - entries
    assert any("__pycache__" in entry for entry in entries)


def test_compose_redis_is_configured_explicitly(services) -> None:
    command = " ".join(argv(services["redis"]["command"]))
    assert "--bind 0.0.0.0" in command and "--protected-mode no" in command
    assert "ports" not in services["redis"]  # reachable on the compose network only


def test_the_cpu_profile_runs_a_cpu_worker_and_no_gpu_reservation(services) -> None:
    cpu = yaml.safe_load((ROOT / "docker-compose.cpu.yml").read_text())["services"]
    assert cpu["worker-gpu0"]["profiles"] == ["gpu"]  # not started by the CPU profile
    worker = cpu["worker-cpu"]
    assert "deploy" not in worker and worker["environment"]["LABELER_DEVICE"] == "cpu"
    assert worker["command"].startswith("labeler worker")
    assert worker["environment"]["LABELER_REDIS_URL"] == \
        services["api"]["environment"]["LABELER_REDIS_URL"]
    assert set(compose_mounts(worker)) == {"/data", "/checkpoints", "/store"}
    args = cpu["api"]["build"]["args"]
    assert "BASE_IMAGE" in args and "TORCH_INDEX_URL" in args
