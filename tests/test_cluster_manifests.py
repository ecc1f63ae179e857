"""The deployment files under cluster/ hold only what Kubernetes, KubeRay and `ray up` accept.

- Core Kubernetes objects are validated against the OpenAPI schema that kubernetes-validate
  ships for KUBERNETES_VERSION, in strict mode: an unknown (say, misspelt) field is an error,
  as it is for `kubectl apply`, whose server-side field validation is strict by default.
- KubeRay objects (RayCluster, RayJob) have no schema there. Their pod templates are validated
  as core PodTemplates, their metadata as core ObjectMeta, and the KubeRay fields around them
  against the KubeRay 1.1 API (cluster/README.md supports operators from 1.1 on), so a field
  that only a newer operator knows is reported too.
- A manifest kept inside a ConfigMap (the RayJob that scheduled-merge.yaml's CronJob creates
  with `kubectl create -f`) is checked like a top-level document.
- Checks the API server makes beyond the schema: volume mounts name declared volumes,
  resource quantities parse, and what a pod refers to (ServiceAccount, ConfigMap, PVC, Role)
  is defined in the same file, since each file is applied on its own.
- cluster/ray-cluster.yaml is a Ray cluster launcher config, validated against the schema
  `ray up` itself applies (ray/autoscaler/ray-schema.json, from the installed Ray).

Every schema comes from an installed package: nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))

# The newest Kubernetes whose schema kubernetes-validate 1.37 ships.
KUBERNETES_VERSION = "1.37"

KUBERAY_KINDS = {"RayCluster", "RayJob"}
# Fields of the KubeRay 1.1 ray.io/v1 API, per object. (backoffLimit of a RayJob, for one,
# came in 1.2.)
RAYJOB_SPEC_FIELDS = {
    "entrypoint", "runtimeEnvYAML", "jobId", "metadata", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
    "activeDeadlineSeconds", "rayClusterSpec", "clusterSelector", "submitterPodTemplate", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy",
}

# Kubernetes resource quantities: a number, then a binary or decimal SI suffix or an exponent.
QUANTITY = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
# An RFC 1123 subdomain, what Kubernetes requires of most object names.
OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

FieldPath = Tuple[Any, ...]


@dataclass
class Document:
    """One object from a file under cluster/kuberay, or a manifest held in one of its ConfigMaps."""

    file: Path
    line: int
    held_in: str  # "" for a top-level document, else "data['rayjob.yaml']" of the ConfigMap at `line`
    obj: Dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind"))

    @property
    def label(self) -> str:
        metadata = self.obj.get("metadata") or {}
        name = metadata.get("name") or f"{metadata.get('generateName', '?')}*"
        held = f" {self.held_in}" if self.held_in else ""
        return f"{self.file.relative_to(ROOT)}:{self.line}{held} ({self.kind} {name})"


def load_documents(path: Path) -> List[Document]:
    """Every YAML document of `path`, with the line it starts on, and the manifests its ConfigMaps hold."""
    documents = []
    with open(path) as stream:
        loader = yaml.SafeLoader(stream)
        try:
            while loader.check_node():
                node = loader.get_node()
                obj = loader.construct_document(node)
                if obj is None:
                    continue
                assert isinstance(obj, dict), f"{path.relative_to(ROOT)}:{node.start_mark.line + 1}: not a mapping"
                top = Document(path, node.start_mark.line + 1, "", obj)
                documents.append(top)
                if obj.get("kind") != "ConfigMap":
                    continue
                for key, text in (obj.get("data") or {}).items():
                    if not key.endswith((".yaml", ".yml")):
                        continue
                    try:
                        held = yaml.safe_load(text)
                    except yaml.YAMLError as error:
                        raise AssertionError(f"{path.relative_to(ROOT)}:{top.line} data[{key!r}]: {error}") from None
                    if isinstance(held, dict) and "apiVersion" in held and "kind" in held:
                        documents.append(Document(path, top.line, f"data[{key!r}]", held))
        finally:
            loader.dispose()
    return documents


DOCUMENTS = {path: load_documents(path) for path in KUBERAY_FILES}
ALL_DOCUMENTS = [document for documents in DOCUMENTS.values() for document in documents]


def field_path(parts: Sequence[Any]) -> str:
    """('spec', 'containers', 0, 'name') -> 'spec.containers[0].name'."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(the object)"


def walk(node: Any, path: FieldPath = ()) -> Iterator[Tuple[FieldPath, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, path + (index,))


def get(obj: Any, path: FieldPath) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def schema_problem(obj: Dict[str, Any]) -> Optional[Tuple[FieldPath, str]]:
    """The (path, message) of the schema violation kubernetes-validate reports for a core object, or None.

    It reports one violation, its best match: a misspelt required field shows as the missing field.
    """
    return _schema_problem(json.dumps(obj, sort_keys=True, default=str))


@functools.lru_cache(maxsize=None)
def _schema_problem(obj_json: str) -> Optional[Tuple[FieldPath, str]]:
    """Cached by content: kubernetes-validate reads its schema files again on every call."""
    try:
        kubernetes_validate.validate(json.loads(obj_json), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return tuple(error.absolute_path), error.message
    return None


def core_object_problems(obj: Dict[str, Any]) -> List[str]:
    try:
        problem = schema_problem(obj)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{obj.get('apiVersion')} {obj.get('kind')}: Kubernetes {KUBERNETES_VERSION} has no such object "
                "(or it is a custom resource this test does not know: check it as the KubeRay ones are)"]
    return [] if problem is None else [f"{field_path(problem[0])}: {problem[1]}"]


def embedded_problems(where: FieldPath, kind: str, wrapped_key: str, value: Any) -> List[str]:
    """Validate `value` (found at `where`) as the `wrapped_key` of a core v1 `kind`, e.g. a pod template."""
    wrapper = {"apiVersion": "v1", "kind": kind, "metadata": {"name": "embedded"}, wrapped_key: value}
    problem = schema_problem(wrapper)
    if problem is None:
        return []
    path, message = problem
    return [f"{field_path(where + path[1:])}: {message}"]


def fields_problems(obj: Any, where: FieldPath, allowed: set, required: set, what: str) -> List[str]:
    if not isinstance(obj, dict):
        return [f"{field_path(where)}: expected a mapping, found {type(obj).__name__}"]
    unknown = [f"{field_path(where + (key,))}: not a field of a KubeRay 1.1 {what}"
               for key in obj if key not in allowed]
    missing = [f"{field_path(where + (key,))}: required" for key in sorted(required - obj.keys())]
    return unknown + missing


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ray_start_params_problems(params: Any, where: FieldPath) -> List[str]:
    """KubeRay's rayStartParams is a map of strings: `num-cpus: 0` unquoted is refused by the CRD."""
    if not isinstance(params, dict):
        return [f"{field_path(where)}: expected a mapping of strings"]
    return [f"{field_path(where + (key,))}: must be a string (quote it)"
            for key, value in params.items() if not isinstance(value, str)]


def ray_cluster_spec_problems(spec: Any, where: FieldPath) -> List[str]:
    """KubeRay would take a cluster without rayVersion or worker groups; these manifests need both."""
    problems = fields_problems(spec, where, RAYCLUSTER_SPEC_FIELDS, {"headGroupSpec", "workerGroupSpecs", "rayVersion"},
                               "RayCluster spec")
    if not isinstance(spec, dict):
        return problems
    if "rayVersion" in spec and not isinstance(spec["rayVersion"], str):
        problems.append(f"{field_path(where + ('rayVersion',))}: must be a string (quote it)")
    head = spec.get("headGroupSpec")
    head_where = where + ("headGroupSpec",)
    problems += fields_problems(head, head_where, HEAD_GROUP_FIELDS, {"rayStartParams", "template"}, "headGroupSpec")
    if isinstance(head, dict):
        problems += ray_start_params_problems(head.get("rayStartParams"), head_where + ("rayStartParams",))
        problems += embedded_problems(head_where + ("template",), "PodTemplate", "template", head.get("template"))
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{field_path(where + ('workerGroupSpecs',))}: expected a non-empty list of worker groups"]
    names = [group.get("groupName") for group in groups if isinstance(group, dict)]
    if len(set(names)) != len(names):
        problems.append(f"{field_path(where + ('workerGroupSpecs',))}: groupName repeated in {names}")
    for index, group in enumerate(groups):
        group_where = where + ("workerGroupSpecs", index)
        problems += fields_problems(group, group_where, WORKER_GROUP_FIELDS,
                                    {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"},
                                    "workerGroupSpec")
        if not isinstance(group, dict):
            continue
        counts = {key: group[key] for key in ("minReplicas", "replicas", "maxReplicas") if key in group}
        problems += [f"{field_path(group_where + (key,))}: must be an integer" for key, value in counts.items()
                     if not is_int(value)]
        ordered = [0] + list(counts.values())
        if all(is_int(value) for value in counts.values()) and ordered != sorted(ordered):
            problems.append(f"{field_path(group_where)}: needs 0 <= minReplicas <= replicas <= maxReplicas, "
                            f"found {counts}")
        problems += ray_start_params_problems(group.get("rayStartParams"), group_where + ("rayStartParams",))
        problems += embedded_problems(group_where + ("template",), "PodTemplate", "template", group.get("template"))
    return problems


def kuberay_problems(obj: Dict[str, Any]) -> List[str]:
    kind = obj["kind"]
    problems = []
    if obj.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: {obj.get('apiVersion')!r}, expected 'ray.io/v1' (the CRDs of KubeRay >= 1.1)")
    problems += fields_problems(obj, (), {"apiVersion", "kind", "metadata", "spec"},
                                {"apiVersion", "kind", "metadata", "spec"}, kind)
    problems += embedded_problems(("metadata",), "ConfigMap", "metadata", obj.get("metadata"))
    spec = obj.get("spec")
    if kind == "RayCluster":
        return problems + ray_cluster_spec_problems(spec, ("spec",))
    problems += fields_problems(spec, ("spec",), RAYJOB_SPEC_FIELDS, {"entrypoint", "rayClusterSpec"}, "RayJob spec")
    if not isinstance(spec, dict):
        return problems
    expected_types = {"entrypoint": str, "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int,
                      "activeDeadlineSeconds": int}
    for key, expected in expected_types.items():
        if key in spec and (not isinstance(spec[key], expected) or (expected is int and not is_int(spec[key]))):
            problems.append(f"spec.{key}: expected {expected.__name__}, found {spec[key]!r}")
    return problems + ray_cluster_spec_problems(spec.get("rayClusterSpec"), ("spec", "rayClusterSpec"))


def pod_spec_problems(obj: Dict[str, Any]) -> List[str]:
    """What the API server refuses in a pod spec although the schema allows it."""
    problems = []
    for where, node in walk(obj):
        if not (isinstance(node, dict) and isinstance(node.get("containers"), list)):
            continue
        volumes = [volume.get("name") for volume in node.get("volumes") or []]
        if len(set(volumes)) != len(volumes):
            problems.append(f"{field_path(where + ('volumes',))}: volume names repeated in {volumes}")
        containers = [("containers", index, c) for index, c in enumerate(node["containers"])]
        containers += [("initContainers", index, c) for index, c in enumerate(node.get("initContainers") or [])]
        names = [container.get("name") for _, _, container in containers]
        if len(set(names)) != len(names):
            problems.append(f"{field_path(where)}: container names repeated in {names}")
        for group, index, container in containers:
            for mount_index, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volumes:
                    problems.append(f"{field_path(where + (group, index, 'volumeMounts', mount_index))}: mounts "
                                    f"volume {mount.get('name')!r}, which the pod does not declare ({volumes})")
    return problems


def quantity_problems(obj: Dict[str, Any]) -> List[str]:
    problems = []
    for where, node in walk(obj):
        if len(where) >= 2 and where[-2] == "resources" and where[-1] in ("requests", "limits") \
                and isinstance(node, dict):
            quantities = [(where + (name,), value) for name, value in node.items()]
        elif where and where[-1] == "sizeLimit":
            quantities = [(where, node)]
        else:
            continue
        problems += [f"{field_path(path)}: {value!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi, 5G)"
                     for path, value in quantities
                     if not (isinstance(value, (int, float)) and not isinstance(value, bool))
                     and not (isinstance(value, str) and QUANTITY.match(value))]
    return problems


def name_problems(obj: Dict[str, Any]) -> List[str]:
    metadata = obj.get("metadata") or {}
    if "name" in metadata:
        name, where = metadata["name"], "metadata.name"
    elif "generateName" in metadata:
        name, where = f"{metadata['generateName']}x", "metadata.generateName"
    else:
        return ["metadata: needs a name (or generateName)"]
    return [] if isinstance(name, str) and OBJECT_NAME.match(name) and len(name) <= 253 else \
        [f"{where}: {name!r} is not a valid Kubernetes object name (lowercase letters, digits, '-', '.')"]


def defined(siblings: Sequence[Document], kind: str) -> set:
    return {document.obj["metadata"].get("name") for document in siblings
            if document.kind == kind and not document.held_in}


def reference_problems(obj: Dict[str, Any], siblings: Sequence[Document]) -> List[str]:
    """Objects referred to must be defined in the same file: each file is applied on its own."""
    problems = []

    def expect(where: FieldPath, kind: str, name: Any) -> None:
        if name not in defined(siblings, kind):
            problems.append(f"{field_path(where)}: refers to {kind} {name!r}, which this file does not define")

    for where, node in walk(obj):
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("containers"), list) and node.get("serviceAccountName", "default") != "default":
            expect(where + ("serviceAccountName",), "ServiceAccount", node["serviceAccountName"])
        for key, kind, name_key in (("configMap", "ConfigMap", "name"), ("configMapRef", "ConfigMap", "name"),
                                    ("secret", "Secret", "secretName"), ("secretRef", "Secret", "name"),
                                    ("persistentVolumeClaim", "PersistentVolumeClaim", "claimName")):
            ref = node.get(key)
            if isinstance(ref, dict) and not ref.get("optional", False):
                expect(where + (key, name_key), kind, ref.get(name_key))
    if obj.get("kind") == "RoleBinding":
        expect(("roleRef", "name"), obj["roleRef"]["kind"], obj["roleRef"]["name"])
        for index, subject in enumerate(obj.get("subjects") or []):
            if subject.get("kind") == "ServiceAccount" and "namespace" not in subject:
                expect(("subjects", index, "name"), "ServiceAccount", subject.get("name"))
    return problems


def document_problems(document: Document, siblings: Sequence[Document]) -> List[str]:
    obj = document.obj
    problems = kuberay_problems(obj) if document.kind in KUBERAY_KINDS else core_object_problems(obj)
    return problems + name_problems(obj) + pod_spec_problems(obj) + quantity_problems(obj) + \
        reference_problems(obj, siblings)


def report(document: Document, problems: List[str]) -> str:
    return f"{document.label}:\n  " + "\n  ".join(problems)


def test_kubernetes_validate_ships_the_schema_version():
    assert Version(kubernetes_validate.latest_version()) >= Version(KUBERNETES_VERSION), (
        f"kubernetes-validate {kubernetes_validate.__version__} has no Kubernetes {KUBERNETES_VERSION} schema: "
        f"install kubernetes-validate>={KUBERNETES_VERSION}")


def test_manifests_hold_what_the_checks_expect():
    """Guards against the checks passing vacuously (a glob finding nothing, a manifest no longer parsed out)."""
    kinds = {(document.kind, bool(document.held_in)) for document in ALL_DOCUMENTS}
    assert {("RayCluster", False), ("RayJob", False), ("RayJob", True), ("CronJob", False)} <= kinds, kinds
    assert {path.name for path in KUBERAY_FILES} >= {"raycluster.yaml", "rayjob.yaml", "scheduled-merge.yaml"}


@pytest.mark.parametrize("document", ALL_DOCUMENTS, ids=lambda document: document.label)
def test_document_is_valid(document):
    problems = document_problems(document, DOCUMENTS[document.file])
    assert not problems, report(document, problems)


def find(file_name: str, kind: str, held: bool = False) -> Document:
    matches = [document for document in DOCUMENTS[CLUSTER / "kuberay" / file_name]
               if document.kind == kind and bool(document.held_in) == held]
    assert len(matches) == 1, f"{file_name}: expected one {kind}, found {len(matches)}"
    return matches[0]


HEAD_POD = ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec")


def rename(path: FieldPath, old: str, new: str) -> Callable[[Dict[str, Any]], None]:
    def mutate(obj: Dict[str, Any]) -> None:
        parent = get(obj, path)
        parent[new] = parent.pop(old)
    return mutate


def assign(path: FieldPath, key: Any, value: Any) -> Callable[[Dict[str, Any]], None]:
    def mutate(obj: Dict[str, Any]) -> None:
        get(obj, path)[key] = value
    return mutate


MISTAKES = {
    "typo of a required pod field in a RayJob": (
        "rayjob.yaml", "RayJob", False, rename(HEAD_POD, "containers", "contaner"),
        "spec.rayClusterSpec.headGroupSpec.template.spec: 'containers' is a required property"),
    "typo of an optional pod field in a RayJob": (
        "rayjob.yaml", "RayJob", False, rename(HEAD_POD, "serviceAccountName", "serviceAcountName"),
        "spec.rayClusterSpec.headGroupSpec.template.spec: Additional properties are not allowed "
        "('serviceAcountName' was unexpected)"),
    "typo of a container field in a RayCluster worker": (
        "raycluster.yaml", "RayCluster", False,
        rename(("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0), "imagePullPolicy",
               "imagePulPolicy"),
        "spec.workerGroupSpecs[0].template.spec.containers[0]: Additional properties are not allowed "
        "('imagePulPolicy' was unexpected)"),
    "typo of a KubeRay field": (
        "raycluster.yaml", "RayCluster", False, rename(("spec", "workerGroupSpecs", 0), "minReplicas", "minReplica"),
        "spec.workerGroupSpecs[0].minReplica: not a field of a KubeRay 1.1 workerGroupSpec"),
    "a RayJob field newer than KubeRay 1.1": (
        "scheduled-merge.yaml", "RayJob", True, assign(("spec",), "backoffLimit", 2),
        "spec.backoffLimit: not a field of a KubeRay 1.1 RayJob spec"),
    "an unquoted rayStartParams number": (
        "rayjob.yaml", "RayJob", False, assign(HEAD_POD[:-2] + ("rayStartParams",), "num-cpus", 0),
        "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus: must be a string"),
    "typo of a CronJob field": (
        "scheduled-merge.yaml", "CronJob", False, rename(("spec",), "concurrencyPolicy", "concurencyPolicy"),
        "spec: Additional properties are not allowed ('concurencyPolicy' was unexpected)"),
    "a quantity with a wrong unit": (
        "rayjob.yaml", "RayJob", False, assign(HEAD_POD + ("containers", 0, "resources", "limits"), "memory", "16GB"),
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].resources.limits.memory: '16GB' is not"),
    "a mount of an undeclared volume": (
        "rayjob.yaml", "RayJob", False, assign(HEAD_POD, "volumes", []),
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].volumeMounts[0]: mounts volume "
        "'merge-config', which the pod does not declare"),
    "a ConfigMap the file does not define": (
        "rayjob.yaml", "RayJob", False, assign(HEAD_POD + ("volumes", 0, "configMap"), "name", "merge-config-typo"),
        "spec.rayClusterSpec.headGroupSpec.template.spec.volumes[0].configMap.name: refers to ConfigMap "
        "'merge-config-typo', which this file does not define"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistake_is_reported_with_its_file_and_field(mistake):
    """The checks are not vacuous: a real manifest with one mistake fails, naming the mistake."""
    file_name, kind, held, mutate, expected = MISTAKES[mistake]
    original = find(file_name, kind, held)
    assert not document_problems(original, DOCUMENTS[original.file])
    broken = Document(original.file, original.line, original.held_in, copy.deepcopy(original.obj))
    mutate(broken.obj)
    problems = document_problems(broken, DOCUMENTS[original.file])
    message = report(broken, problems)
    assert any(expected in problem for problem in problems), message
    assert message.startswith(f"cluster/kuberay/{file_name}:{original.line}"), message


def shell_words(command: str, cwd: Path) -> List[str]:
    """The words a POSIX shell passes to `command`'s program, after expansion (`$(date ...)` included).

    KubeRay and Ray run a RayJob's entrypoint through a shell; printf prints each word it is given.
    """
    result = subprocess.run(["sh", "-c", "printf '%s\\0' " + command], cwd=cwd, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, f"the shell refuses {command!r}: {result.stderr}"
    return result.stdout.split("\0")[:-1]


def option(words: List[str], name: str) -> Optional[str]:
    return words[words.index(name) + 1] if name in words[:-1] else None


@pytest.mark.parametrize("document", [document for document in ALL_DOCUMENTS if document.kind == "RayJob"],
                         ids=lambda document: document.label)
def test_rayjob_entrypoint_runs_distmerge_on_its_cluster(document, tmp_path):
    """The entrypoint runs on the Ray head: without `--address auto` distmerge would start its own local Ray."""
    entrypoint = document.obj["spec"]["entrypoint"]
    words = shell_words(entrypoint, tmp_path)
    assert words[:1] == ["distmerge"] and words[1:2] in (["merge"], ["batch"]), f"{document.label}: {words}"
    assert option(words, "--address") == "auto", f"{document.label}: spec.entrypoint lacks --address auto: {words}"


def test_scheduled_merge_creates_a_batch_rayjob_on_every_run(tmp_path):
    documents = DOCUMENTS[CLUSTER / "kuberay" / "scheduled-merge.yaml"]
    cronjob = find("scheduled-merge.yaml", "CronJob").obj
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[:2] == ["create", "-f"], f"CronJob {cronjob['metadata']['name']}: runs {command}"
    manifest = Path(command[2])

    mount = next(mount for mount in container["volumeMounts"] if Path(mount["mountPath"]) == manifest.parent)
    volume = next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
    configmap = next(document.obj for document in documents if document.kind == "ConfigMap"
                     and document.obj["metadata"]["name"] == volume["configMap"]["name"])
    rayjob = yaml.safe_load(configmap["data"][manifest.name])
    assert rayjob["kind"] == "RayJob"
    assert "name" not in rayjob["metadata"] and rayjob["metadata"]["generateName"], \
        "the RayJob needs generateName (and no name) to be created again on every run"

    words = shell_words(rayjob["spec"]["entrypoint"], tmp_path)
    assert words[:2] == ["distmerge", "batch"] and re.fullmatch(r"s3://[^/]+/requests/", words[2]), words
    assert re.fullmatch(r"s3://[^/]+/reports/\d{8}T\d{6}Z\.json", option(words, "--report") or ""), words
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True

    # Its comments promise that two nightly runs never overlap: the deadline ends a run before the next starts.
    assert re.fullmatch(r"\d+ \d+ \* \* \*", cronjob["spec"]["schedule"]), cronjob["spec"]["schedule"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert rayjob["spec"]["activeDeadlineSeconds"] + cronjob["spec"]["startingDeadlineSeconds"] < 24 * 3600

    # The submitter's ServiceAccount may create RayJobs.
    bindings = [document.obj for document in documents if document.kind == "RoleBinding"
                and {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in document.obj["subjects"]]
    roles = {document.obj["metadata"]["name"]: document.obj for document in documents if document.kind == "Role"}
    granted = [rule for binding in bindings for rule in roles[binding["roleRef"]["name"]]["rules"]
               if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]]
    assert any("create" in rule["verbs"] for rule in granted), f"{pod['serviceAccountName']} may not create RayJobs"


def test_ray_version_is_the_same_everywhere():
    """The image's Ray, the KubeRay manifests' rayVersion and the launcher's pinned Ray must agree."""
    image = re.search(r"^ARG RAY_VERSION=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert image, "cluster/Dockerfile: no ARG RAY_VERSION=..."
    versions = {"cluster/Dockerfile ARG RAY_VERSION": image.group(1)}
    for document in ALL_DOCUMENTS:
        spec = document.obj.get("spec") or {}
        cluster_spec = spec.get("rayClusterSpec", spec) if document.kind in KUBERAY_KINDS else {}
        if "rayVersion" in cluster_spec:
            versions[f"{document.label} rayVersion"] = cluster_spec["rayVersion"]
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for pin in re.findall(r"ray\[default\]==([\w.]+)", json.dumps(launcher["setup_commands"])):
        versions["cluster/ray-cluster.yaml setup_commands"] = pin
    assert len(versions) >= 5 and len(set(versions.values())) == 1, json.dumps(versions, indent=1)


def ray_cluster_config_schema() -> Dict[str, Any]:
    """The schema `ray up` validates a cluster config with, from the installed Ray (found without importing it)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin, "Ray is not installed"
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_launcher_config_is_what_ray_up_accepts():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = ray_cluster_config_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"cluster/ray-cluster.yaml: {field_path(error.absolute_path)}: {error.message}"
              for error in validator.iter_errors(config)]
    assert not errors, "\n".join(errors)

    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types, \
        f"cluster/ray-cluster.yaml: head_node_type {config['head_node_type']!r} is not in available_node_types"
    for name, node_type in node_types.items():
        if name != config["head_node_type"]:
            bounds = (node_type.get("min_workers", 0), node_type["max_workers"], config["max_workers"])
            assert bounds == tuple(sorted(bounds)) and bounds[0] >= 0, (
                f"cluster/ray-cluster.yaml: available_node_types.{name}: needs 0 <= min_workers <= max_workers "
                f"<= max_workers of the cluster, found {bounds}")
    # Every node installs distmerge from the checkout that file_mounts copies to it.
    (checkout,) = [Path(remote).name for remote, local in config["file_mounts"].items() if local == "."]
    assert any("pip install" in command and f"/{checkout} " in command for command in config["setup_commands"]), \
        f"cluster/ray-cluster.yaml: no setup_commands entry pip-installs the checkout copied to {checkout}"
