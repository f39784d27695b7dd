"""Static checks of deploy/kubernetes/: the schemas, then what no schema knows.

Every manifest is validated, offline, against the Kubernetes API's own schemas as
PyPI's ``kubernetes-validate`` ships them (strict: an unknown or misspelt field is an
error, as ``kubectl apply``'s default server-side field validation makes it), for
Kubernetes 1.30 and the newest release the package ships; the KEDA ScaledObject against
SCALEDOBJECT_SCHEMA below, the spec of KEDA 2.20.2's CRD written out (every field, its
type, bounds and required fields; the CRD itself is not vendored: set ``MAAS_KEDA_CRD``
to a copy of KEDA's ``config/crd/bases/keda.sh_scaledobjects.yaml`` to validate against
it as well).
Then the project's facts: every variable a manifest sets is a setting of
maas_worker/settings.py with a valid value, every command is a real ``maas-worker``
command line, exactly one beat, the worker's grace period above the longest job, the
image, ports, roles and health checks those of docker/, the KEDA spec that of
docs/monitoring.md, key files only ever copied 0600 into memory, nothing runs as
root, and no secret value is committed. Each check is a function returning the
problems it found, and the last tests break a manifest to show that each one can fail.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from maas_worker.errors import ConfigError
from maas_worker.options import declared
from maas_worker.settings import (
    DEFAULT_FLEET_METRICS_PORT,
    DEFAULT_HARD_TIME_LIMIT_S,
    DEFAULT_METRICS_PORT,
    Settings,
)
from tests.unit.test_deploy_files import (
    COMPOSE,
    SERVICE_ROLES,
    assert_cli_command,
    dockerfile_instructions,
    interpolate,
)

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate.utils", reason="kubernetes-validate is in the dev extra"
)
jsonschema = pytest.importorskip("jsonschema", reason="kubernetes-validate brings jsonschema")

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
TEMPLATES = KUBE / "secret-templates"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"
#: An older release still common in clusters, and the newest the package ships: no
#: field newer than 1.30, and none removed since.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: What a Secret template holds instead of a value.
PLACEHOLDER = "REPLACE_ME"
#: compose service -> the component label of the workload that mirrors it.
COMPONENTS = {s: s for s in ("worker", "beat", "flower", "metrics", "gateway")}
#: Key files the processes load (the loaders refuse them unless mode 0600/0400).
KEY_SECRETS = {"maas-keyring", "maas-model-keys", "maas-gateway-keyring"}
SETTINGS = {option.env: option for option in declared(Settings)}

Doc = dict[str, Any]


# -- loading -------------------------------------------------------------------------------
def kustomization() -> Doc:
    doc = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources() -> list[Doc]:
    """Every resource of the kustomization, as kustomize would apply it (namespace and
    images set; labels are not needed by any check)."""
    kust = kustomization()
    images = {i["name"]: i for i in kust.get("images", [])}
    docs = []
    for name in kust["resources"]:
        for doc in map(copy.deepcopy, load_docs(KUBE / name)):
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kust["namespace"]
            for container in containers(doc, init=True):
                image = images.get(container["image"])
                if image:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
            docs.append(doc)
    return docs


def templates() -> list[Doc]:
    return [d for path in sorted(TEMPLATES.glob("*.yaml")) for d in load_docs(path)]


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return resources()


def pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: Doc, init: bool = False) -> Iterator[Doc]:
    spec = pod_spec(doc)
    if spec is None:
        return
    yield from spec["containers"]
    if init:
        yield from spec.get("initContainers", [])


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if pod_spec(d) is not None]


def component(doc: Doc) -> str:
    label: str = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    return label


def by_component(docs: list[Doc]) -> dict[str, Doc]:
    return {component(d): d for d in workloads(docs)}


def maas_containers(docs: list[Doc], init: bool = False) -> Iterator[tuple[Doc, Doc]]:
    for doc in workloads(docs):
        for c in containers(doc, init):
            if c["image"].startswith("maas-worker"):
                yield doc, c


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def compose() -> Doc:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def configmap(docs: list[Doc], name: str) -> dict[str, str]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    data: dict[str, str] = cm.get("data", {})
    return data


# -- the kustomization ------------------------------------------------------------------------
def kustomization_problems(kust: Doc, folder: Path) -> list[str]:
    """Each listed resource exists, each manifest in the folder is listed, no Secret is."""
    problems = []
    listed = set(kust["resources"])
    for name in sorted(listed):
        if not (folder / name).is_file():
            problems.append(f"{name} is listed but does not exist")
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml" and path.name not in listed:
            problems.append(f"{path.name} is not listed in kustomization.yaml")
    for name in sorted(listed):
        if (folder / name).is_file() and any(
            d.get("kind") == "Secret" for d in load_docs(folder / name)
        ):
            problems.append(f"{name}: a Secret in the kustomization (apply would overwrite it)")
    return problems


def test_the_kustomization_lists_every_manifest_and_no_secret() -> None:
    assert kustomization_problems(kustomization(), KUBE) == []
    assert not any(str(r).startswith("secret-templates") for r in kustomization()["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) not installed")
def test_kubectl_kustomize_builds_the_same_resources(docs: list[Doc]) -> None:
    """kubectl's own kustomize, offline (it needs no cluster to build)."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    built = [d for d in yaml.safe_load_all(out) if d]

    def key(d: Doc) -> tuple[str, str, str]:
        return d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")

    assert sorted(map(key, built)) == sorted(map(key, docs))
    images = {c["image"] for d in built for c in containers(d, init=True)}
    assert images == {c["image"] for d in docs for c in containers(d, init=True)}


# -- schemas ---------------------------------------------------------------------------------
def _int(minimum: int | None = None) -> Doc:
    return {"type": "integer"} if minimum is None else {"type": "integer", "minimum": minimum}


def _obj(properties: Doc, required: tuple[str, ...] = ()) -> Doc:
    # additionalProperties false: a misspelt field is an error, not silently pruned.
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_HPA_RULES = _obj(
    {
        "policies": {
            "type": "array",
            "items": _obj(
                {"periodSeconds": _int(), "type": _STR, "value": _int()},
                ("periodSeconds", "type", "value"),
            ),
        },
        "selectPolicy": _STR,
        "stabilizationWindowSeconds": _int(),
        "tolerance": {"type": ["integer", "string"]},
    }
)
#: KEDA's ScaledObject (keda.sh/v1alpha1), spec as in the CRD of KEDA v2.20.2
#: (config/crd/bases/keda.sh_scaledobjects.yaml): every field, its type, bounds and
#: required fields, written out here (the CRD itself is not vendored); status is
#: the controller's and left out. The CRD's one CEL rule is checked in
#: scaledobject_problems.
SCALEDOBJECT_SCHEMA: Doc = _obj(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": _obj(
            {
                "advanced": _obj(
                    {
                        "horizontalPodAutoscalerConfig": _obj(
                            {
                                "behavior": _obj({"scaleDown": _HPA_RULES, "scaleUp": _HPA_RULES}),
                                "name": _STR,
                            }
                        ),
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": _obj(
                            {
                                "activationTarget": _STR,
                                "formula": _STR,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                                "target": _STR,
                            }
                        ),
                    }
                ),
                "cooldownPeriod": _int(0),
                "fallback": _obj(
                    {
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                                "scalingModifiers",
                            ]
                        },
                        "failureThreshold": _int(0),
                        "replicas": _int(0),
                    },
                    ("failureThreshold", "replicas"),
                ),
                "idleReplicaCount": _int(0),
                "initialCooldownPeriod": _int(0),
                "maxReplicaCount": _int(1),
                "minReplicaCount": _int(0),
                "pollingInterval": _int(1),
                "scaleTargetRef": _obj(
                    {
                        "apiVersion": _STR,
                        "envSourceContainerName": _STR,
                        "kind": _STR,
                        "name": {"type": "string", "minLength": 1},
                    },
                    ("name",),
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "authenticationRef": _obj(
                                {
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                    "name": _STR,
                                },
                                ("name",),
                            ),
                            "metadata": {"type": "object", "additionalProperties": _STR},
                            "metricType": _STR,
                            "name": _STR,
                            "type": {"type": "string", "minLength": 1},
                            "useCachedMetrics": {"type": "boolean"},
                        },
                        ("metadata", "type"),
                    ),
                },
            },
            ("scaleTargetRef", "triggers"),
        ),
    },
    ("spec",),
)
#: The Prometheus scaler's metadata (KEDA v2.20.2, pkg/scalers/prometheus_scaler.go):
#: what it reads, and what it requires. Anything else would be ignored, silently.
PROMETHEUS_METADATA = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "awsRegion",
    "timeout",
    "identityOwner",
    "authModes",
}
PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}


def strict_crd_schema(schema: Doc) -> Doc:
    """A CRD's openAPIV3Schema as JSON Schema, strict: every object whose properties are
    listed refuses others (kubectl's field validation), ``int-or-string`` either type."""
    schema = dict(schema)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
    if "properties" in schema:
        schema["properties"] = {k: strict_crd_schema(v) for k, v in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict_crd_schema(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict_crd_schema(s) for s in schema[key]]
    return schema


def schema_problems(doc: Doc, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """``doc`` against its API's schema (Kubernetes' for each of ``versions``, or KEDA's)."""
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion", "").startswith("keda.sh/"):
        schemas = [("KEDA 2.20 (written out)", SCALEDOBJECT_SCHEMA)]
        crd = os.environ.get("MAAS_KEDA_CRD")
        if crd:
            (version,) = yaml.safe_load(Path(crd).read_text())["spec"]["versions"]
            schemas.append((crd, strict_crd_schema(version["schema"]["openAPIV3Schema"])))
        return [
            f"{name} ({where}): {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for where, schema in schemas
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)
        ]
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            problems.append(f"{name} (Kubernetes {version}): {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name}: {e.message}")
    return problems


def test_every_manifest_and_template_validates_against_its_schema(docs: list[Doc]) -> None:
    problems = [p for doc in [*docs, *templates()] for p in schema_problems(doc)]
    assert problems == []
    assert any(d["kind"] == "ScaledObject" for d in docs)


# -- the project's facts ---------------------------------------------------------------------
def settings_problems(docs: list[Doc]) -> list[str]:
    """Every variable set is a setting; literal values parse; secret ones come from Secrets."""
    problems = []
    shared = configmap(docs, "maas-settings")
    for name in shared:
        if name not in SETTINGS:
            problems.append(f"ConfigMap maas-settings: {name} is not a setting of settings.py")
        elif SETTINGS[name].secret:
            problems.append(f"ConfigMap maas-settings: {name} is secret: from a Secret only")
    for doc, container in maas_containers(docs, init=True):
        where = f"{doc['metadata']['name']}/{container['name']}"
        literal = {}
        for ref in container.get("envFrom", []):
            if ref.get("configMapRef", {}).get("name") != "maas-settings":
                problems.append(f"{where}: envFrom other than the maas-settings ConfigMap")
        for name, entry in env_of(container).items():
            if name not in SETTINGS:
                problems.append(f"{where}: {name} is not a setting of maas_worker/settings.py")
            elif "value" in entry:
                if SETTINGS[name].secret:
                    problems.append(f"{where}: {name} is secret: it must come from a Secret")
                literal[name] = entry["value"]
            elif "secretKeyRef" not in entry.get("valueFrom", {}):
                problems.append(f"{where}: {name} comes from neither a value nor a Secret")
        if container.get("envFrom"):
            literal = {**shared, **literal}
        try:
            Settings.from_env(literal)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def test_every_variable_is_a_real_setting_with_a_valid_value(docs: list[Doc]) -> None:
    assert settings_problems(docs) == []


def copied_key_files(script: str) -> list[tuple[str, str]]:
    """The (source, destination) of each ``install -m 0600 SRC DST`` line of ``script``."""
    pairs = []
    for line in script.splitlines():
        words = shlex.split(line)
        if words[:1] == ["install"]:
            assert words[1:3] == ["-m", "0600"] and len(words) == 5, line
            pairs.append((words[3], words[4]))
    return pairs


def mount_volume(container: Doc, path: str) -> str | None:
    """The volume whose mount holds ``path`` in ``container``."""
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            name: str = mount["name"]
            return name
    return None


def command_problems(docs: list[Doc]) -> list[str]:
    """maas-worker command lines and probes are real; init containers only copy keys."""
    problems = []
    for doc, container in maas_containers(docs, init=True):
        where = f"{doc['metadata']['name']}/{container['name']}"
        command = container.get("command", [])
        if container in (pod_spec(doc) or {}).get("initContainers", []):
            if command[:2] != ["sh", "-ec"] or not copied_key_files(command[2]):
                problems.append(f"{where}: an init container only copies key files")
            continue
        try:
            assert_cli_command(command, where)
        except pytest.fail.Exception as exc:
            problems.append(str(exc))
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind, {}).get("exec", {}).get("command")
            if probe and probe[0] == "maas-worker":
                try:
                    assert_cli_command(probe, f"{where} {kind}")
                except pytest.fail.Exception as exc:
                    problems.append(str(exc))
            elif probe:
                if probe[:2] != ["python", "-c"]:
                    problems.append(f"{where} {kind}: neither maas-worker nor python -c")
                else:
                    compile(probe[2], f"{where} {kind}", "exec")
    return problems


def test_every_command_and_probe_is_a_real_command_line(docs: list[Doc]) -> None:
    assert command_problems(docs) == []
    commands = {c["command"][1] for _, c in maas_containers(docs)}
    assert commands == {"worker", "beat", "flower", "metrics", "gateway"}


def beat_problems(docs: list[Doc]) -> list[str]:
    """Exactly one beat: one workload runs it, with one replica, never two at once."""
    beats = [d for d, c in maas_containers(docs) if c["command"][:2] == ["maas-worker", "beat"]]
    if len(beats) != 1:
        return [f"{len(beats)} workloads run maas-worker beat, not 1"]
    (beat,) = beats
    problems = []
    if beat["kind"] != "Deployment" or beat["spec"].get("replicas") != 1:
        problems.append("beat must be a Deployment with replicas: 1")
    if beat["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("beat's strategy must be Recreate (a rolling update runs two)")
    for so in (d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")):
        if so["spec"]["scaleTargetRef"]["name"] == beat["metadata"]["name"]:
            problems.append(f"{so['kind']} {so['metadata']['name']} scales beat")
    probe = beat["spec"]["template"]["spec"]["containers"][0].get("livenessProbe", {})
    compose_check = compose()["services"]["beat"]["healthcheck"]["test"]
    if probe.get("exec", {}).get("command") != compose_check[1:]:
        problems.append("beat's liveness probe is not compose's alive-file check")
    if (
        env_of(beat["spec"]["template"]["spec"]["containers"][0])
        .get("MAAS_BEAT_ALIVE_FILE", {})
        .get("value")
        != compose()["services"]["beat"]["environment"]["MAAS_BEAT_ALIVE_FILE"]
    ):
        problems.append("beat's MAAS_BEAT_ALIVE_FILE is not the file its probe reads")
    return problems


def test_exactly_one_beat(docs: list[Doc]) -> None:
    assert beat_problems(docs) == []


def worker_problems(docs: list[Doc]) -> list[str]:
    """The worker: a warm shutdown's grace, the image's health check, scaled by KEDA only."""
    worker = by_component(docs)["worker"]
    spec = worker["spec"]["template"]["spec"]
    problems = []
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= DEFAULT_HARD_TIME_LIMIT_S:
        problems.append(f"worker grace {grace} s is not above the longest job (hard limit)")
    stop = compose()["services"]["worker"]["stop_grace_period"]
    if grace != int(stop.rstrip("m")) * 60:
        problems.append(f"worker grace {grace} s is not compose's stop_grace_period {stop}")
    if "replicas" in worker["spec"]:
        problems.append("the worker sets replicas: each apply would undo KEDA's choice")
    (container,) = spec["containers"]
    healthcheck = next(rest for kind, rest in dockerfile_instructions() if kind == "HEALTHCHECK")
    image_check = re.search(r"CMD (\[.*\])", healthcheck)
    assert image_check
    expected = yaml.safe_load(image_check.group(1))
    for kind in ("startupProbe", "livenessProbe"):
        if container.get(kind, {}).get("exec", {}).get("command") != expected:
            problems.append(f"worker {kind} is not the image's HEALTHCHECK {expected}")
    if "--concurrency" not in container["command"]:
        problems.append("worker without --concurrency runs one process per node CPU")
    return problems


def test_the_worker_shuts_down_warm_and_is_checked_like_the_image(docs: list[Doc]) -> None:
    assert worker_problems(docs) == []


def security_problems(docs: list[Doc]) -> list[str]:
    """Non-root, read-only root, no capability, RuntimeDefault seccomp, bounded resources."""
    problems = []
    for doc in workloads(docs):
        spec = pod_spec(doc)
        assert spec is not None
        name = doc["metadata"]["name"]
        pod = spec.get("securityContext", {})
        if pod.get("runAsNonRoot") is not True or pod.get("runAsUser") in (None, 0):
            problems.append(f"{name}: the pod may run as root")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token it never uses")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{name}: shares a host namespace")
        if spec.get("enableServiceLinks") is not False:
            # Service links would put MAAS_REDIS_PORT=tcp://... and the like (from the
            # maas-* Services) into every process's MAAS_* settings namespace.
            problems.append(f"{name}: Service links put MAAS_* variables in the pod")
        for c in containers(doc, init=True):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root file system")
            if sc.get("capabilities") != {"drop": ["ALL"]} or sc.get("privileged"):
                problems.append(f"{where}: capabilities not all dropped")
            if sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False:
                problems.append(f"{where}: runs as root")
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                if set(resources.get(part, {})) != {"cpu", "memory"}:
                    problems.append(f"{where}: {part} must set cpu and memory")
    return problems


def test_nothing_runs_as_root_or_unbounded(docs: list[Doc]) -> None:
    assert security_problems(docs) == []


def key_file_problems(docs: list[Doc]) -> list[str]:
    """Key files reach a process only as 0600 copies in memory, at the paths it reads.

    A Secret volume's files are root's, group fsGroup's, mode defaultMode | 0440 when
    fsGroup is set: the keyring loader (tenancy/keyring.py check_permissions) and the
    model-keys loader refuse a group-readable file, and without fsGroup user 10001
    cannot read it at all. So an init container copies each one into a memory emptyDir.
    """
    problems = []
    image_env = dict(
        word.split("=", 1)
        for kind, rest in dockerfile_instructions()
        if kind == "ENV"
        for word in rest.split()
        if "=" in word
    )
    for doc in workloads(docs):
        spec = pod_spec(doc)
        assert spec is not None
        name = doc["metadata"]["name"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        key_volumes = {
            n for n, v in volumes.items() if v.get("secret", {}).get("secretName") in KEY_SECRETS
        }
        if not key_volumes:
            continue
        if spec.get("securityContext", {}).get("fsGroup") != spec["securityContext"]["runAsUser"]:
            problems.append(f"{name}: key Secrets need fsGroup = the pod's user to be read")
        for c in spec["containers"]:
            for mount in c.get("volumeMounts", []):
                if mount["name"] in key_volumes:
                    problems.append(f"{name}/{c['name']} mounts a key Secret (group-readable)")
        copied = {}
        for init in spec.get("initContainers", []):
            for src, dst in copied_key_files(init["command"][2]):
                if mount_volume(init, src) not in key_volumes:
                    problems.append(f"{name}: {src} is not in a key Secret")
                target = volumes.get(mount_volume(init, dst) or "", {})
                if target.get("emptyDir", {}).get("medium") != "Memory":
                    problems.append(f"{name}: {dst} is not in a memory emptyDir")
                copied[dst] = mount_volume(init, dst)
        (main,) = spec["containers"]
        env = {**image_env, **{k: v.get("value") for k, v in env_of(main).items()}}
        wanted = {
            "worker": ("MAAS_KEYRING", "MAAS_MODEL_KEYS"),
            "gateway": ("MAAS_GATEWAY_KEYRING",),
        }[component(doc)]
        for var in wanted:
            path = env.get(var)
            if path not in copied or mount_volume(main, path) != copied[path]:
                problems.append(f"{name}: {var}={path} is not where a key file is copied to")
    return problems


def test_key_files_are_copied_0600_into_memory(docs: list[Doc]) -> None:
    assert key_file_problems(docs) == []
    # The Dockerfile's defaults are what the worker reads (it sets neither variable).
    worker_env = env_of(by_component(docs)["worker"]["spec"]["template"]["spec"]["containers"][0])
    assert "MAAS_KEYRING" not in worker_env and "MAAS_MODEL_KEYS" not in worker_env


def test_the_init_copy_turns_a_secret_file_into_one_the_loaders_accept(
    docs: list[Doc], tmp_path: Path
) -> None:
    """The worker's init script, run for real on a Secret volume's file modes."""
    from maas_worker.models.artifact_crypto import ModelKey, ModelKeys
    from maas_worker.tenancy.keyring import Keyring, KeyringError, load_keyring, save_keyring

    (init,) = by_component(docs)["worker"]["spec"]["template"]["spec"]["initContainers"]
    script = init["command"][2].replace("/run/maas/", f"{tmp_path}/")
    for folder in ("secrets/keyring", "secrets/model-keys", "keyring", "model-keys"):
        (tmp_path / folder).mkdir(parents=True)
    secret = tmp_path / "secrets" / "keyring" / "keyring.json"
    save_keyring(secret, Keyring().with_new_tenant("acme"))
    secret.chmod(0o440)  # what a Secret volume shows with fsGroup, whatever defaultMode
    with pytest.raises(KeyringError, match="group or others"):
        load_keyring(secret)

    subprocess.run(["sh", "-ec", script], check=True, timeout=30)
    copy_ = tmp_path / "keyring" / "keyring.json"
    assert copy_.stat().st_mode & 0o777 == 0o600
    assert set(load_keyring(copy_).tenants) == {"acme"}
    assert not (tmp_path / "model-keys" / "model-keys.json").exists()  # optional

    keys = tmp_path / "secrets" / "model-keys" / "model-keys.json"
    key = ModelKey.generate()
    ModelKeys({key.key_id: key}).save(keys)
    keys.chmod(0o440)
    with pytest.raises(ConfigError, match="group or others"):
        ModelKeys.load(keys)
    subprocess.run(["sh", "-ec", script], check=True, timeout=30)
    assert ModelKeys.load(tmp_path / "model-keys" / "model-keys.json").get(key.key_id) == key


def compose_problems(docs: list[Doc]) -> list[str]:
    """The image, ports, commands and Redis roles agree with docker/compose.yaml."""
    problems = []
    services = interpolate(compose()["services"])
    workload = by_component(docs)
    expose = {
        int(p) for kind, rest in dockerfile_instructions() if kind == "EXPOSE" for p in rest.split()
    }
    for service, comp in COMPONENTS.items():
        doc = workload.get(comp)
        if doc is None:
            problems.append(f"compose service {service} has no Kubernetes workload")
            continue
        (c,) = doc["spec"]["template"]["spec"]["containers"]
        if c["image"] != services[service]["image"]:
            problems.append(f"{comp}: image {c['image']}, compose {services[service]['image']}")
        if c["command"] != services[service]["command"][: len(c["command"])] and comp != "worker":
            problems.append(f"{comp}: command {c['command']} is not compose's")
        user, _ = SERVICE_ROLES[service]
        ref = env_of(c).get("MAAS_BROKER_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref != {"name": "maas-redis-urls", "key": user}:
            problems.append(f"{comp}: MAAS_BROKER_URL is not the {user} role's URL")
        ports = {p["containerPort"] for p in c.get("ports", [])}
        command = services[service]["command"]
        if "--port" in command:
            wanted = {int(command[command.index("--port") + 1])}
        elif service == "worker":
            wanted = {DEFAULT_METRICS_PORT}
        elif service == "metrics":
            wanted = {DEFAULT_FLEET_METRICS_PORT}
        else:
            wanted = set()
        if ports != wanted:
            problems.append(f"{comp}: container ports {ports}, compose's {wanted}")
        if service in ("worker", "metrics", "flower") and not ports <= expose:
            problems.append(f"{comp}: ports {ports} are not all EXPOSEd by the Dockerfile")
    redis_image = interpolate(compose()["services"]["redis"]["image"])
    (redis,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    if rc["image"] != redis_image or rc["args"] != compose()["services"]["redis"]["command"]:
        problems.append("Redis: not compose's image and command")
    return problems


def test_image_ports_commands_and_roles_agree_with_compose(docs: list[Doc]) -> None:
    assert compose_problems(docs) == []


def service_problems(docs: list[Doc]) -> list[str]:
    """Each Service selects one workload's pods, on a port that workload names."""
    problems = []
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [
            w
            for w in workloads(docs)
            if svc["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        if len(selected) != 1:
            problems.append(f"Service {svc['metadata']['name']} selects {len(selected)} workloads")
            continue
        named = {
            p["name"]: p["containerPort"]
            for c in selected[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            if named.get(port["targetPort"]) != port["port"]:
                problems.append(f"Service {svc['metadata']['name']}: {port} has no such pod port")
    return problems


def test_every_service_reaches_a_named_port(docs: list[Doc]) -> None:
    assert service_problems(docs) == []


def network_policy_problems(docs: list[Doc]) -> list[str]:
    """Redis admits exactly the workloads that connect to it."""
    clients = {component(d) for d, c in maas_containers(docs) if "MAAS_BROKER_URL" in env_of(c)}
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = {
        v
        for e in peer["podSelector"]["matchExpressions"]
        if e["key"] == "app.kubernetes.io/component"
        for v in e["values"]
    }
    problems = []
    if allowed != clients:
        problems.append(f"Redis admits {sorted(allowed)}, its clients are {sorted(clients)}")
    redis_labels = by_component(docs)["redis"]["spec"]["template"]["metadata"]["labels"]
    if not policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items():
        problems.append("the NetworkPolicy does not select the Redis pods")
    if rule["ports"] != [{"protocol": "TCP", "port": 6379}]:
        problems.append("the NetworkPolicy opens more than Redis's port")
    return problems


def test_only_the_redis_clients_reach_redis(docs: list[Doc]) -> None:
    assert network_policy_problems(docs) == []


def documented_scaledobject() -> Doc:
    """The ScaledObject of docs/monitoring.md, "KEDA"."""
    section = MONITORING_DOC.read_text().split("### KEDA", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block, "docs/monitoring.md has the KEDA example"
    doc: Doc = yaml.safe_load(block.group(1))
    return doc


def scaledobject_problems(docs: list[Doc]) -> list[str]:
    """docs/monitoring.md's ScaledObject on the worker, in the exporter's bounds."""
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    spec = so["spec"]
    problems = []
    if spec != documented_scaledobject()["spec"]:
        problems.append("the ScaledObject is not docs/monitoring.md's")
    # The CRD's CEL rule (x-kubernetes-validations), which no JSON Schema states.
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        problems.append("minReplicaCount must be less than or equal to maxReplicaCount")
    worker = by_component(docs)["worker"]
    if spec["scaleTargetRef"]["name"] != worker["metadata"]["name"]:
        problems.append("the ScaledObject does not scale the worker Deployment")
    if spec["scaleTargetRef"].get("kind", "Deployment") != worker["kind"]:
        problems.append("the ScaledObject's target is not the worker's kind")
    metrics = by_component(docs)["metrics"]["spec"]["template"]["spec"]["containers"][0]
    exporter = Settings.from_env(
        {k: v["value"] for k, v in env_of(metrics).items() if "value" in v}
    )
    if (spec["minReplicaCount"], spec["maxReplicaCount"]) != (
        exporter.fleet.min_nodes,
        exporter.fleet.max_nodes,
    ):
        problems.append("the ScaledObject's bounds are not the exporter's MAAS_FLEET_*_NODES")
    exporter_source = (ROOT / "maas_worker" / "monitoring" / "exporter.py").read_text()
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] != "prometheus":
            problems.append(f"trigger {trigger['type']}: the recommendation is Prometheus's")
            continue
        if set(meta) - PROMETHEUS_METADATA or PROMETHEUS_REQUIRED - set(meta):
            problems.append(f"prometheus trigger metadata {sorted(meta)}: unknown or missing keys")
        for key in ("threshold", "activationThreshold"):
            try:
                float(meta.get(key, "0"))
            except ValueError:
                problems.append(f"prometheus trigger {key} {meta[key]!r} is not a number")
        for metric in re.findall(r"maas_\w+", meta.get("query", "")):
            if f'"{metric}"' not in exporter_source:
                problems.append(f"{metric} is not a metric of the fleet exporter")
    return problems


def test_keda_scales_the_worker_on_the_fleet_recommendation(docs: list[Doc]) -> None:
    assert scaledobject_problems(docs) == []
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert "maas_fleet_desired_nodes" in so["spec"]["triggers"][0]["metadata"]["query"]


_URL_WITH_PASSWORD = re.compile(r"rediss?://[^:/@\s]+:(?P<password>[^@\s]+)@")
_LONG_HEX = re.compile(r"\b[0-9a-fA-F]{32,}\b")


def secret_problems(
    docs: list[Doc], secret_templates: list[Doc], texts: dict[str, str]
) -> list[str]:
    """No value committed; every Secret used has a template with the keys used, and back."""
    problems = []
    for name, text in texts.items():
        for m in _URL_WITH_PASSWORD.finditer(text):
            # The templates' placeholder, or a comment's <password> or printf's %s.
            if not re.fullmatch(rf"{PLACEHOLDER}|<\w+>|%s", m.group("password")):
                problems.append(f"{name}: a URL with a password")
        if _LONG_HEX.search(text) or ("BEGIN" in text and "PRIVATE KEY" in text):
            problems.append(f"{name}: what looks like a key")
    shapes: dict[str, set[str]] = {}
    for t in secret_templates:
        if t["kind"] != "Secret" or "data" in t:
            problems.append(f"template {t['metadata']['name']}: only stringData placeholders")
            continue
        values = t.get("stringData", {})
        for key, value in values.items():
            url = _URL_WITH_PASSWORD.match(value)
            if value != PLACEHOLDER and not (url and url.group("password") == PLACEHOLDER):
                problems.append(f"template {t['metadata']['name']}.{key}: not a placeholder")
        shapes[t["metadata"]["name"]] = set(values)
    used: dict[str, set[str]] = {}
    for doc in workloads(docs):
        spec = pod_spec(doc)
        assert spec is not None
        for v in spec.get("volumes", []):
            if "secret" in v:
                used.setdefault(v["secret"]["secretName"], set())
        for c in containers(doc, init=True):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
    if set(used) != set(shapes):
        problems.append(f"Secrets used {sorted(used)}, templates {sorted(shapes)}")
    for name, keys in used.items():
        if not keys <= shapes.get(name, set()):
            problems.append(f"Secret {name}: keys {sorted(keys)} not all in its template")
    return problems


def committed_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(KUBE.rglob("*.yaml"))}


def test_no_secret_value_is_committed(docs: list[Doc]) -> None:
    assert secret_problems(docs, templates(), committed_texts()) == []


def documented_steps() -> list[list[str]]:
    """The shell lines of docs/operations.md's "Kubernetes" section, as words."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    joined = re.sub(r"\\\n\s*", " ", "".join(blocks))
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def test_the_documented_steps_are_real_commands_and_make_the_templates_secrets() -> None:
    steps = documented_steps()
    for line in steps:
        command = [w for w in line if not re.fullmatch(r"MAAS_\w+=.*", w)]
        if command[:1] == ["maas-worker"]:
            assert_cli_command(command, "docs/operations.md, Kubernetes")
    shapes = {t["metadata"]["name"]: set(t["stringData"]) for t in templates()}
    made: dict[str, set[str]] = {}
    for words in steps:
        if words[:6] == ["kubectl", "-n", "maas", "create", "secret", "generic"]:
            keys = made.setdefault(words[6], set())
            for arg in words[7:]:
                if arg.startswith("--from-file=") and "=" in arg[len("--from-file=") :]:
                    keys.add(arg[len("--from-file=") :].split("=", 1)[0])
                elif arg == "--from-file=redis-urls/":
                    keys.update(shapes["maas-redis-urls"])  # one file per role, checked below
                elif arg.startswith("--from-file="):
                    keys.add(Path(arg[len("--from-file=") :]).name)
    # maas-model-keys is optional (encrypted models only): its step is a comment.
    assert set(made) == set(shapes) - {"maas-model-keys"}
    for name, keys in made.items():
        assert keys == shapes[name], name
    loop = next(w for w in steps if w[:3] == ["for", "role", "in"])
    assert {w.rstrip(";") for w in loop[3 : loop.index("do")]} == shapes["maas-redis-urls"]


# -- each check can fail ---------------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()
_POD = "spec.template.spec"
_MAIN = f"{_POD}.containers.0"


def _add_env(name: str, value: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        doc["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": name, "value": value}
        )

    return mutate


BROKEN: list[tuple[str, str, Callable[[Doc], None], Callable[[list[Doc]], list[str]]]] = [
    (
        "misspelt field",
        "worker",
        _set(f"{_POD}.terminationGracePeriod", 360),
        lambda ds: schema_problems(_find(ds, "worker")),
    ),
    (
        "wrong type",
        "metrics",
        _set("spec.replicas", "one"),
        lambda ds: schema_problems(_find(ds, "metrics")),
    ),
    (
        "KEDA field typo",
        "ScaledObject",
        _set("spec.maxReplicas", 20),
        lambda ds: schema_problems(_find(ds, "ScaledObject")),
    ),
    (
        "KEDA bound",
        "ScaledObject",
        _set("spec.pollingInterval", 0),
        lambda ds: schema_problems(_find(ds, "ScaledObject")),
    ),
    ("not a setting", "worker", _add_env("MAAS_WORKER_THREADS", "4"), settings_problems),
    ("invalid value", "metrics", _add_env("MAAS_FLEET_MAX_NODES", "many"), settings_problems),
    ("password inline", "flower", _add_env("MAAS_FLOWER_BASIC_AUTH", "ops:pw"), settings_problems),
    ("unknown command", "flower", _set(f"{_MAIN}.command.1", "flowers"), command_problems),
    (
        "unknown option",
        "worker",
        _set(f"{_MAIN}.startupProbe.exec.command.2", "--wait"),
        command_problems,
    ),
    ("two beats", "beat", _set("spec.replicas", 2), beat_problems),
    ("rolling beat", "beat", _set("spec.strategy", {"type": "RollingUpdate"}), beat_problems),
    ("short grace", "worker", _set(f"{_POD}.terminationGracePeriodSeconds", 60), worker_problems),
    ("fixed replicas", "worker", _set("spec.replicas", 3), worker_problems),
    ("root", "gateway", _set(f"{_POD}.securityContext.runAsUser", 0), security_problems),
    (
        "writable root",
        "beat",
        _set(f"{_MAIN}.securityContext.readOnlyRootFilesystem", False),
        security_problems,
    ),
    ("service links", "metrics", _set(f"{_POD}.enableServiceLinks", _DELETE), security_problems),
    ("service links", "metrics", _set(f"{_POD}.enableServiceLinks", _DELETE), security_problems),
    ("no limits", "flower", _set(f"{_MAIN}.resources", {}), security_problems),
    ("keyring on disk", "worker", _set(f"{_POD}.volumes.2.emptyDir", {}), key_file_problems),
    (
        "Secret mounted",
        "gateway",
        _set(f"{_MAIN}.volumeMounts.0.name", "gateway-keyring-secret"),
        key_file_problems,
    ),
    ("no fsGroup", "worker", _set(f"{_POD}.securityContext.fsGroup", _DELETE), key_file_problems),
    ("wrong port", "flower", _set(f"{_MAIN}.ports.0.containerPort", 5556), compose_problems),
    (
        "wrong role",
        "beat",
        _set(f"{_MAIN}.env.0.valueFrom.secretKeyRef.key", "worker"),
        compose_problems,
    ),
    ("wrong image", "metrics", _set(f"{_MAIN}.image", "maas-worker:latest"), compose_problems),
    ("lost port name", "gateway", _set(f"{_MAIN}.ports.0.name", "web"), service_problems),
    (
        "Redis open",
        "NetworkPolicy",
        _set(
            "spec.ingress.0.from.0.podSelector.matchExpressions.1",
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["worker"]},
        ),
        network_policy_problems,
    ),
    ("not the doc's", "ScaledObject", _set("spec.cooldownPeriod", 30), scaledobject_problems),
    (
        "other metric",
        "ScaledObject",
        _set("spec.triggers.0.metadata.query", "max(maas_nodes)"),
        scaledobject_problems,
    ),
]


def _find(docs: list[Doc], which: str) -> Doc:
    for d in docs:
        if d["kind"] == which or (pod_spec(d) is not None and component(d) == which):
            return d
    raise AssertionError(which)


@pytest.mark.parametrize(("what", "which", "mutate", "check"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_check_fails_on_a_broken_manifest(
    docs: list[Doc],
    what: str,
    which: str,
    mutate: Callable[[Doc], None],
    check: Callable[[list[Doc]], list[str]],
) -> None:
    assert check(docs) == [], "the real manifests pass"
    broken = copy.deepcopy(docs)
    mutate(_find(broken, which))
    assert check(broken), f"{what}: the check did not notice"


def test_the_kustomization_and_secret_checks_fail_too(docs: list[Doc], tmp_path: Path) -> None:
    kust = kustomization()
    missing = {**kust, "resources": [*kust["resources"], "cronjob.yaml"]}
    assert kustomization_problems(missing, KUBE) == ["cronjob.yaml is listed but does not exist"]
    unlisted = {**kust, "resources": kust["resources"][1:]}
    assert kustomization_problems(unlisted, KUBE) == [
        f"{kust['resources'][0]} is not listed in kustomization.yaml"
    ]
    (tmp_path / "secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {a: b}\n"
    )
    assert kustomization_problems({"resources": ["secret.yaml"]}, tmp_path)
    texts = committed_texts()
    leaked = {**texts, "x.yaml": "url: redis://worker:0123abcd@maas-redis:6379/0\n"}
    assert secret_problems(docs, templates(), leaked) == ["x.yaml: a URL with a password"]
    hexed = {**texts, "x.yaml": f"key: {'ab' * 32}\n"}
    assert secret_problems(docs, templates(), hexed) == ["x.yaml: what looks like a key"]
    filled = copy.deepcopy(templates())
    filled[0]["stringData"][next(iter(filled[0]["stringData"]))] = "ops:hunter2"
    assert secret_problems(docs, filled, texts)
    assert secret_problems(docs, templates()[1:], texts)  # a Secret used with no template
