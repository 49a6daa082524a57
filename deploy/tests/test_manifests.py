"""Offline checks of everything under deploy/: the Kubernetes manifests, the Dockerfiles and the HAProxy config.

No cluster, Docker daemon or network is needed. The manifests are rendered with kustomize_lite (the subset of
kustomize the overlays use, checked against `kubectl kustomize`), Kubernetes' own kinds are validated against the
schemas of Kubernetes 1.30 bundled by kubernetes-validate (strict: unknown fields fail), the two custom resources
against crd_schemas.py (written from upstream's docs), and every value that must agree with the server is read
from the server's code: the routes (src/serve/router.rs), the flags (src/cli/serve.rs and the structs it
flattens), the metrics (src/serve/metrics.rs), the environment variables and the provider names (src/).

Run:  ~/.cache/fluxrt/venv/bin/python -m pytest deploy/tests -q -p no:cacheprovider
Needs deploy/tests/requirements.txt in that venv and Debian's haproxy (`apt-get install haproxy`).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest

try:
    import jsonschema
    import kubernetes_validate
    import yaml
    from dockerfile_parse import DockerfileParser
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"{e}: install the deploy checks' dependencies into this Python with "
                      f"`{sys.executable} -m pip install -r deploy/tests/requirements.txt`") from e

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crd_schemas  # noqa: E402
import kustomize_lite  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
# The image's uid (Dockerfiles' USER) that the pods run as.
UID = 10001
# The Python of each runtime base image, which the wheel's path in ORT_DYLIB_PATH depends on.
RUNTIME_PYTHON = {"debian:bookworm-slim": "3.11", "ubuntu24.04": "3.12"}


# ---------------------------------------------------------------------------------------------------------------
# What the server's code says

def read(rel: str) -> str:
    return (REPO / rel).read_text()


def kebab(field: str) -> str:
    return field.replace("_", "-")


@functools.lru_cache(maxsize=None)
def cli_structs() -> dict[str, str]:
    """Body of every `struct` in src/cli/ by name; serve's own `Args` as `serve::Args` (each subcommand has one)."""
    out: dict[str, str] = {}
    for path in sorted((REPO / "src" / "cli").glob("*.rs")):
        for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", path.read_text(), re.S):
            name = m.group(1)
            if name == "Args":
                name = f"{path.stem}::Args"
            out[name] = m.group(2) + "\n"
    return out


@functools.lru_cache(maxsize=None)
def serve_flags() -> dict[str, str]:
    """`--flag` -> Rust type of every option `fluxrt serve` takes: `#[arg(long ...)]` fields of serve's Args and of
    the structs it `#[command(flatten)]`s, snake_case field names as --kebab-case unless `long = "..."`."""
    flags: dict[str, str] = {}
    field = re.compile(r"#\[(arg|command)\((.*?)\)\]\s*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*([\w:<>, ]+?),?\s*\n",
                       re.S)

    def walk(struct: str) -> None:
        body = cli_structs()[struct]
        for kind, attrs, name, ty in field.findall(body):
            if kind == "command":
                if "flatten" in attrs:
                    walk(ty.strip())
                continue
            explicit = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
            if explicit:
                flags[f"--{explicit.group(1)}"] = ty.strip()
            elif re.search(r"\blong\b", attrs):
                flags[f"--{kebab(name)}"] = ty.strip()

    walk("serve::Args")
    return flags


@functools.lru_cache(maxsize=None)
def routes() -> dict[str, str]:
    """Path -> HTTP method of every route in src/serve/router.rs."""
    return {path: method.upper() for path, method in
            re.findall(r'\.route\(\s*"([^"]+)"\s*,\s*(get|post|put|delete|patch)\(', read("src/serve/router.rs"))}


@functools.lru_cache(maxsize=None)
def gauges() -> set[str]:
    """Names of the gauges /metrics exposes (src/serve/metrics.rs): the scrape-time ones and the registered
    `Gauge` fields. Gauges keep their name in the exposition (counters gain `_total`)."""
    text = read("src/serve/metrics.rs")
    names = set(re.findall(r'\bgauge\(\s*"(\w+)"', text))
    gauge_fields = set(re.findall(r"^\s*(\w+):\s*Gauge\b", text, re.M))
    for name, fld in re.findall(r'register\(\s*"(\w+)",\s*"[^"]*",\s*m\.(\w+)\.clone\(\)', text):
        if fld in gauge_fields:
            names.add(name)
    return names


@functools.lru_cache(maxsize=None)
def provider_names() -> set[str]:
    """Every name (and alias) `--provider` accepts: the match arms of Provider's FromStr (src/runtime/types.rs)."""
    names: set[str] = set()
    for arm in re.findall(r"^\s*((?:\"[a-z]+\"\s*\|?\s*)+)=>\s*Provider::", read("src/runtime/types.rs"), re.M):
        names.update(re.findall(r'"([a-z]+)"', arm))
    return names


@functools.lru_cache(maxsize=None)
def env_vars_read_by_code() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "src").rglob("*.rs"):
        names.update(re.findall(r'"([A-Z][A-Z0-9_]+)"', path.read_text()))
    return names


def readme_pins() -> dict[str, str]:
    """`pip install onnxruntime==X` / `onnxruntime-gpu==X` in the README (its set-up commands)."""
    return dict(re.findall(r"pip install (onnxruntime(?:-gpu)?)==([0-9][0-9.]*[0-9])", read("README.md")))


# ---------------------------------------------------------------------------------------------------------------
# The manifests

@functools.lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple:
    return tuple(kustomize_lite.render(OVERLAYS[overlay]))


def rendered(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(overlay)))


def one(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(resources: list[dict]) -> dict:
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "fluxrt")


def parse_args(args: list[str]) -> dict[str, str | None]:
    """`--flag=value`, `--flag value` and bare `--flag` -> {flag: value or None}; a positional word fails."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        a = args[i]
        assert a.startswith("--"), f"unexpected positional argument {a!r} in {args}"
        if "=" in a:
            flag, value = a.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flag, value = a, args[i + 1]
            i += 1
        else:
            flag, value = a, None
        assert flag not in out, f"{flag} given twice in {args}"
        out[flag] = value
        i += 1
    return out


def server_args(overlay: str) -> dict[str, str | None]:
    return parse_args(server_container(rendered(overlay))["args"])


def container_port(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == ref)


# ---------------------------------------------------------------------------------------------------------------
# The Dockerfiles

class Dockerfile:
    def __init__(self, path: Path):
        self.path = path
        self.parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
        self.stages: list[list[dict]] = []
        for ins in self.parser.structure:
            if ins["instruction"] == "FROM":
                self.stages.append([])
            if self.stages:
                self.stages[-1].append(ins)

    @property
    def images(self) -> list[str]:
        return self.parser.parent_images

    def instructions(self, name: str, stage: int = -1) -> list[str]:
        return [i["value"] for i in self.stages[stage] if i["instruction"] == name]

    def last(self, name: str, stage: int = -1) -> str:
        values = self.instructions(name, stage)
        assert values, f"{self.path.name}: no {name} in stage {stage}"
        return values[-1]

    def exec_form(self, name: str) -> list[str]:
        value = self.last(name)
        assert value.startswith("["), f"{self.path.name}: {name} should be in exec form (JSON), got {value}"
        return json.loads(value)

    @property
    def env(self) -> dict[str, str]:
        return self.parser.envs


@functools.lru_cache(maxsize=None)
def dockerfile(name: str) -> Dockerfile:
    return Dockerfile(DOCKERFILES[name])


# ---------------------------------------------------------------------------------------------------------------
# HAProxy

def haproxy_sections() -> dict[str, list[str]]:
    """'frontend fluxrt' -> its lines (stripped, comments dropped), in order."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            assert current, f"haproxy.cfg: {raw!r} is outside any section"
            sections[current].append(line.strip())
    return sections


def haproxy_section(prefix: str) -> list[str]:
    found = [v for k, v in haproxy_sections().items() if k.split()[0] == prefix]
    assert len(found) == 1, f"haproxy.cfg should have one {prefix} section"
    return found[0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(ms|s|m|h)?", value)
    assert m, f"not a duration: {value}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 0.001}[m.group(2)]


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy") if Path(p).is_file()), None)
    assert found, "HAProxy is not installed, so deploy/haproxy.cfg cannot be checked: `apt-get install haproxy`"
    return found


# ===============================================================================================================
# Kubernetes: rendering and schemas

EXPECTED_KINDS = ["Deployment", "PersistentVolumeClaim", "PersistentVolumeClaim", "PodDisruptionBudget",
                  "ScaledObject", "Service", "ServiceMonitor"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_resource(overlay):
    resources = rendered(overlay)
    assert sorted(r["kind"] for r in resources) == EXPECTED_KINDS
    for r in resources:
        assert r["metadata"]["labels"]["app.kubernetes.io/name"] == "fluxrt", f"{r['kind']} lacks the app label"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_against_kubernetes_schemas(overlay):
    checked = []
    for r in rendered(overlay):
        if (r["apiVersion"], r["kind"]) in crd_schemas.SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(r, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {r['kind']} {r['metadata']['name']}: {e.message} at "
                        f"{'.'.join(map(str, e.path))}")
        checked.append(r["kind"])
    assert "Deployment" in checked and "Service" in checked


def test_the_schema_check_rejects_unknown_and_mistyped_fields():
    """Guards the check above: strict mode must fail a misspelt field and a wrong type, or it checks nothing."""
    deploy = one(rendered("base"), "Deployment")
    typo = copy.deepcopy(deploy)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(deploy)
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "90"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_documented_fields(overlay):
    for r in rendered(overlay):
        schema = crd_schemas.SCHEMAS.get((r["apiVersion"], r["kind"]))
        if schema is None:
            continue
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(r), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{r['kind']}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    # KEDA hands `behavior` to the HPA it creates: check it as Kubernetes' own autoscaling/v2 type.
    behavior = one(rendered(overlay), "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda-hpa"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fluxrt"},
                    "minReplicas": 1, "maxReplicas": 2, "behavior": behavior}}
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_crd_schemas_reject_unknown_fields():
    so = copy.deepcopy(one(rendered("base"), "ScaledObject"))
    so["spec"]["triggers"][0]["metadata"]["treshold"] = "2"
    assert list(jsonschema.Draft202012Validator(crd_schemas.SCALED_OBJECT).iter_errors(so))
    sm = copy.deepcopy(one(rendered("base"), "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(jsonschema.Draft202012Validator(crd_schemas.SERVICE_MONITOR).iter_errors(sm))


def test_kustomize_lite_merges_like_kustomize():
    """The few strategic-merge rules the overlays rely on (checked against `kubectl kustomize` by hand)."""
    base = {"spec": {"containers": [{"name": "a", "args": ["x", "y"], "ports": [{"containerPort": 1}],
                                     "startupProbe": {"periodSeconds": 10, "failureThreshold": 30}},
                                    {"name": "b"}],
                     "tolerations": [{"key": "k"}]}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["z"], "startupProbe": {"failureThreshold": 180}}],
                      "tolerations": [{"key": "n"}], "nodeSelector": {"gpu": "true"}}}
    merged = kustomize_lite.strategic_merge(base, patch)
    a = merged["spec"]["containers"][0]
    assert a["args"] == ["z"], "a list of strings is replaced"
    assert a["startupProbe"] == {"periodSeconds": 10, "failureThreshold": 180}, "maps merge"
    assert a["ports"] == [{"containerPort": 1}] and merged["spec"]["containers"][1] == {"name": "b"}
    assert merged["spec"]["tolerations"] == [{"key": "n"}], "tolerations have no merge key: replaced"
    assert merged["spec"]["nodeSelector"] == {"gpu": "true"}


# ===============================================================================================================
# Kubernetes against the server's code

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_servers_routes(overlay):
    c = server_container(rendered(overlay))
    expected = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{probe} should check {path} (readiness: 503 until warm and while draining)"
        assert routes().get(get["path"]) == "GET", f"{get['path']} is not a GET route in src/serve/router.rs"
    sm = one(rendered(overlay), "ServiceMonitor")
    for ep in sm["spec"]["endpoints"]:
        assert routes().get(ep["path"]) == "GET", f"ServiceMonitor scrapes {ep['path']}, not a GET route"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_port_end_to_end(overlay):
    """--port = containerPort = Service targetPort = Service port = the probes' and the scrape's port, and the
    same port the images EXPOSE and the HAProxy frontend binds."""
    resources = rendered(overlay)
    c = server_container(resources)
    port = int(server_args(overlay)["--port"])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert c["ports"][0]["name"] == "http"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(c, c[probe]["httpGet"]["port"]) == port, probe
    svc = one(resources, "Service")
    (svc_port,) = svc["spec"]["ports"]
    assert container_port(c, svc_port["targetPort"]) == port
    assert svc_port["port"] == port
    sm = one(resources, "ServiceMonitor")
    assert [ep["port"] for ep in sm["spec"]["endpoints"]] == [svc_port["name"]]
    for name in DOCKERFILES:
        assert dockerfile(name).last("EXPOSE") == str(port), f"Dockerfile.{name} EXPOSE"
    bind = [line for line in haproxy_section("frontend") if line.startswith("bind ")]
    assert [b.split()[1].rsplit(":", 1)[1] for b in bind] == [str(port)], "HAProxy's frontend port"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_args_are_serve_flags(overlay):
    flags = serve_flags()
    assert "--drain-delay" in flags, "src/cli/serve.rs has no --drain-delay yet (the manifests depend on it)"
    for flag, value in server_args(overlay).items():
        assert flag in flags, f"{flag} is not an option of `fluxrt serve` (src/cli/serve.rs and what it flattens)"
        if value is None:
            assert flags[flag] in ("bool", "Option<bool>"), f"{flag} takes a value"
        else:
            assert flags[flag] != "bool", f"{flag} is a switch and takes no value"
    for required in ("--host", "--port", "--model", "--drain-delay", "--shutdown-timeout", "--request-timeout"):
        assert required in server_args(overlay), f"{overlay}: pass {required} explicitly"
    assert server_args(overlay)["--host"] == "0.0.0.0", "listen on the pod's address, not loopback"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_providers_are_known(overlay):
    value = server_args(overlay).get("--provider")
    for name in (value or "cpu").split(","):
        assert name.strip().lower() in provider_names(), f"unknown provider {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_drain_and_shutdown(overlay):
    args = server_args(overlay)
    drain, shutdown = float(args["--drain-delay"]), float(args["--shutdown-timeout"])
    assert drain > 0, "a zero drain delay closes the port before endpoints and balancers stop routing"
    pod = one(rendered(overlay), "Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain + shutdown, f"terminationGracePeriodSeconds {grace} <= drain {drain} + shutdown {shutdown}"
    # The drain must outlast the readiness probe's way out of the endpoints (period x failures).
    ready = server_container(rendered(overlay))["readinessProbe"]
    assert drain >= ready["periodSeconds"] * ready["failureThreshold"]
    # No preStop: --drain-delay does its job (a comment in deployment.yaml says so).
    assert "lifecycle" not in server_container(rendered(overlay))


@pytest.mark.parametrize("overlay, minimum", [("base", 300), ("cpu", 300), ("gpu", 1800)])
def test_startup_probe_allows_the_warm_up(overlay, minimum):
    """Startup ends at /ready 200, after the warm-up run (TensorRT engine builds on the GPU overlay)."""
    p = server_container(rendered(overlay))["startupProbe"]
    assert p["periodSeconds"] * p["failureThreshold"] >= minimum


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaledobject_scales_the_deployment_on_a_queue_gauge(overlay):
    resources = rendered(overlay)
    so = one(resources, "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == one(resources, "Deployment")["metadata"]["name"]
    assert "replicas" not in one(resources, "Deployment")["spec"], "KEDA owns the replica count"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    metrics = set(re.findall(r"\b(fluxrt_\w+)", query))
    assert "fluxrt_queue_depth" in metrics
    assert metrics <= gauges(), f"{metrics - gauges()} are not gauges in src/serve/metrics.rs"
    # The ServiceMonitor's job label is the Service's name unless jobLabel says otherwise.
    sm = one(resources, "ServiceMonitor")
    assert "jobLabel" not in sm["spec"]
    assert re.findall(r'job="([^"]+)"', query) == [one(resources, "Service")["metadata"]["name"]]
    assert so["spec"]["minReplicaCount"] >= 2, "one replica can drain while another serves"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_pick_the_servers_pods(overlay):
    resources = rendered(overlay)
    deploy = one(resources, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    svc = one(resources, "Service")

    def matches(selector: dict, labels: dict) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert matches(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(svc["spec"]["selector"], pod_labels)
    assert matches(one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(one(resources, "ServiceMonitor")["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_as_the_images_user_with_a_read_only_root(overlay):
    resources = rendered(overlay)
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = server_container(resources)
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID and sc["runAsGroup"] == UID
    assert sc["fsGroup"] == UID, "the cache claim must be writable by the image's user"
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    for name in DOCKERFILES:
        assert dockerfile(name).last("USER").split(":")[0] == str(UID)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_model_read_only_and_caches_on_the_claim(overlay):
    resources = rendered(overlay)
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = server_container(resources)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    claims = {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}
    for v in volumes.values():
        if "persistentVolumeClaim" in v:
            assert v["persistentVolumeClaim"]["claimName"] in claims, f"volume {v['name']}: no such claim"
    assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
    model = Path(server_args(overlay)["--model"])
    model_mount = next(m for p, m in mounts.items() if model.is_relative_to(p))
    assert model_mount.get("readOnly") is True
    cache = mounts["/cache"]
    assert "persistentVolumeClaim" in volumes[cache["name"]], "the caches must survive restarts"
    # The images point every cache under /cache; an explicit --trt-cache-dir must be there too.
    for name in DOCKERFILES:
        env = dockerfile(name).env
        for var in ("FLUXRT_CACHE_DIR", "FLUXRT_OPTIMIZED_CACHE", "XDG_CACHE_HOME"):
            assert Path(env[var]).is_relative_to("/cache"), f"Dockerfile.{name}: {var}={env[var]}"
    trt = server_args(overlay).get("--trt-cache-dir")
    if trt is not None:
        assert Path(trt).is_relative_to("/cache")
    assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_vars_are_read_by_the_code(overlay):
    for e in server_container(rendered(overlay)).get("env", []):
        assert e["name"] in env_vars_read_by_code(), f"nothing in src/ reads {e['name']}"
    threads = next(e for e in server_container(rendered(overlay))["env"] if e["name"] == "FLUXRT_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert "cpu" in server_container(rendered(overlay))["resources"]["limits"], "FLUXRT_THREADS needs a CPU limit"


def test_gpu_overlay_asks_for_a_gpu_and_uses_tensorrt():
    resources = rendered("gpu")
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    c = server_container(resources)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    args = server_args("gpu")
    assert args["--provider"].split(",")[0] == "tensorrt"
    assert Path(args["--trt-cache-dir"]).is_relative_to("/cache")
    assert args["--workers"] == "1", "one worker per GPU"
    assert c["image"] == "fluxrt:cuda"
    assert server_container(rendered("cpu"))["image"] == "fluxrt:cpu"
    for overlay in ("base", "cpu"):
        assert "nvidia.com/gpu" not in server_container(rendered(overlay))["resources"]["limits"]
        assert "tolerations" not in one(rendered(overlay), "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_are_guaranteed(overlay):
    res = server_container(rendered(overlay))["resources"]
    assert res["requests"] == res["limits"], "requests = limits: Guaranteed QoS, whole cores"


# ===============================================================================================================
# Dockerfiles

def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    exe = str(hadolint) if hadolint.is_file() else shutil.which("hadolint")
    assert exe, f"hadolint is not installed: `{sys.executable} -m pip install -r deploy/tests/requirements.txt`"
    # Every rule at every level; the Dockerfiles carry their few `# hadolint ignore=` pragmas with a reason.
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES.values())],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name, build, runtime, features", [
    ("cpu", r"rust:1\.95-bookworm", r"debian:bookworm-slim", None),
    ("cuda", r"nvidia/cuda:(13\.\d+\.\d+)-devel-ubuntu24\.04",
     r"nvidia/cuda:(13\.\d+\.\d+)-cudnn-runtime-ubuntu24\.04", "cuda,tensorrt"),  # onnxruntime-gpu 1.31: CUDA 13
], ids=["cpu", "cuda"])
def test_dockerfile_is_a_multi_stage_build_of_the_readme_commands(name, build, runtime, features):
    d = dockerfile(name)
    assert len(d.stages) >= 2 and d.parser.is_multistage
    b, r = d.images[0], d.images[-1]
    mb, mr = re.fullmatch(build, b), re.fullmatch(runtime, r)
    assert mb and mr, f"Dockerfile.{name}: stages from {b} and {r}"
    if mb.groups():
        assert mb.group(1) == mr.group(1), "the build and runtime CUDA versions differ"
    runs = " ".join(d.instructions("RUN", 0))
    assert "cargo build --release --locked" in runs
    if features:
        assert f"--features {features}" in runs
    # The runtime stage takes only the binary from the build.
    copies = d.instructions("COPY")
    assert any(c.startswith("--from=") and c.split()[-1].endswith("/fluxrt") for c in copies)


@pytest.mark.parametrize("name, package", [("cpu", "onnxruntime"), ("cuda", "onnxruntime-gpu")])
def test_dockerfile_installs_the_readmes_onnx_runtime(name, package):
    d = dockerfile(name)
    version = readme_pins()[package]
    assert version == readme_pins()["onnxruntime"]
    # The same version the test venv pins (export/requirements.txt, which scripts/test.sh installs).
    assert f"onnxruntime=={version}" in read("export/requirements.txt")
    assert any(i["instruction"] == "ARG" and i["value"] == f"ONNXRUNTIME_VERSION={version}"
               for i in d.parser.structure), f"Dockerfile.{name}: ARG ONNXRUNTIME_VERSION={version}"
    runs = " ".join(d.instructions("RUN"))
    assert f'"{package}==${{ONNXRUNTIME_VERSION}}"' in runs, f"Dockerfile.{name} should pip install {package}"
    lib = d.env["ORT_DYLIB_PATH"]
    python = next(v for k, v in RUNTIME_PYTHON.items() if k in d.images[-1])
    assert lib == f"/opt/venv/lib/python{python}/site-packages/onnxruntime/capi/libonnxruntime.so.{version}"
    assert 'test -f "${ORT_DYLIB_PATH}"' in runs, "the build should fail when the wheel's layout changes"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_fluxrt_serve_as_the_manifests_expect(name):
    d = dockerfile(name)
    assert d.exec_form("ENTRYPOINT") == ["fluxrt", "serve"]
    cmd = parse_args(d.exec_form("CMD"))
    for flag in cmd:
        assert flag in serve_flags(), f"Dockerfile.{name} CMD: {flag} is not a `fluxrt serve` option"
    assert cmd["--host"] == "0.0.0.0"
    assert cmd["--port"] == d.last("EXPOSE") == server_args("base")["--port"]
    assert Path(cmd["--model"]).is_relative_to("/models")
    assert d.last("STOPSIGNAL") == "SIGTERM"
    volumes = json.loads(d.last("VOLUME"))
    assert "/models" in volumes and "/cache" in volumes
    # Health check: liveness on /health, with the standard library's urllib (the slim image has no curl).
    hc = d.last("HEALTHCHECK")
    assert "python3" in hc and "FLUXRT_HEALTH_URL" in hc
    url = urlparse(d.env["FLUXRT_HEALTH_URL"])
    assert url.path == "/health" and routes()["/health"] == "GET"
    assert str(url.port) == cmd["--port"]
    for var in d.env:
        if var.startswith(("FLUXRT_", "ORT_")) and var != "FLUXRT_HEALTH_URL":
            assert var in env_vars_read_by_code(), f"Dockerfile.{name}: nothing in src/ reads {var}"
    assert "Serve(serve::Args)" in read("src/cli/mod.rs"), "`fluxrt serve` is the subcommand the image runs"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_everything_the_build_reads(name):
    """The build stage COPYs only some paths: every file src/ embeds (include_str!/include_bytes!) and every
    explicit target in Cargo.toml must be inside one of them, and .dockerignore must not drop them."""
    d = dockerfile(name)
    sources = []
    for c in d.instructions("COPY", 0):
        words = [w for w in shlex.split(c) if not w.startswith("--")]
        sources += [Path(w.rstrip("/")) for w in words[:-1]]

    def covered(rel: Path) -> bool:
        return any(rel == s or rel.is_relative_to(s) for s in sources)

    needed = {Path("Cargo.toml"), Path("Cargo.lock")}
    for path in (REPO / "src").rglob("*.rs"):
        for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', path.read_text()):
            needed.add((path.parent / inc).resolve().relative_to(REPO))
    # Cargo reads every explicit target's file when it loads the manifest, benches included.
    manifest = tomllib.loads(read("Cargo.toml"))
    for kind, folder in (("bin", "src/bin"), ("bench", "benches")):
        for target in manifest.get(kind, []):
            needed.add(Path(target.get("path", f"{folder}/{target['name']}.rs")))
    needed.add(Path(manifest["lib"]["path"]))
    missing = sorted(str(p) for p in needed if not covered(p))
    assert not missing, f"Dockerfile.{name}'s build stage does not COPY {missing}"
    for p in needed:
        assert (REPO / p).exists(), p
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for s in sources + [Path("models/tiny-flux-schnell")]:
        for pattern in ignored:
            p = pattern.rstrip("/")
            assert not (s.match(p) or s.is_relative_to(p)), f".dockerignore's {pattern} drops {s}, which is COPYed"


# ===============================================================================================================
# HAProxy

def test_haproxy_accepts_the_config():
    r = subprocess.run([haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_haproxy_checks_ready_and_retries_elsewhere():
    backend = haproxy_section("backend")
    assert "balance leastconn" in backend
    assert "option httpchk GET /ready" in backend and routes()["/ready"] == "GET"
    assert "http-check expect status 200" in backend
    retry_on = next(line.split()[1:] for line in backend if line.startswith("retry-on "))
    assert {"conn-failure", "empty-response", "503", "response-timeout"} <= set(retry_on)
    assert "429" not in retry_on, "429 is the fleet saying it is full: the client gets it with Retry-After"
    assert "retries 3" in backend
    assert any(line.split()[:2] == ["option", "redispatch"] for line in backend)


def test_haproxy_timeouts_fit_long_generations():
    lines = haproxy_section("defaults")
    timeouts = {line.split()[1]: seconds(line.split()[2]) for line in lines if line.startswith("timeout ")}
    request_timeout = float(server_args("base")["--request-timeout"])
    assert timeouts["server"] > request_timeout, "the balancer must not cut an answer the replica still sends"
    assert timeouts["client"] >= timeouts["server"]
    assert timeouts["http-request"] <= 30 and timeouts["connect"] <= 5


def test_haproxy_server_lines_are_a_replaceable_template():
    """tests/load_balancer.rs swaps the one `bind` line and the block of `server` lines for its own."""
    binds = [line for lines in haproxy_sections().values() for line in lines if line.startswith("bind ")]
    assert len(binds) == 1, "exactly one bind line (the load-balancer test rewrites it)"
    backend = haproxy_section("backend")
    servers = [i for i, line in enumerate(backend) if line.startswith("server ")]
    assert servers == list(range(len(backend) - len(servers), len(backend))), "server lines: one block, at the end"
    options = set()
    ports = []
    for i in servers:
        words = backend[i].split()
        host, port = words[2].rsplit(":", 1)
        assert host == "127.0.0.1"
        ports.append(int(port))
        options.add(" ".join(words[3:]))
        assert "check" in words
    assert ports == list(range(18081, 18081 + len(ports))) and len(ports) >= 2
    (opts,) = options
    assert "inter 1s fall 2 rise 1" in opts, "down after 2 failed checks 1 s apart, up after one success"
    base_drain = float(server_args("base")["--drain-delay"])
    assert base_drain >= 2, "a replica's drain delay must outlast HAProxy's 2 x 1 s to take it out"
