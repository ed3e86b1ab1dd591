#!/usr/bin/env python3
"""Offline checks of loopvol's Kubernetes deployment (run by deploy/validate.sh).

Input: the manifests each overlay renders to (kustomize output), the settings
file each was rendered with, and the example manifests. Checks:

  schema     every built-in object against the Kubernetes OpenAPI schema, strict
             (unknown fields are errors), for each requested Kubernetes version
             (the schemas shipped in the kubernetes-validate package: no network)
  crd        VolumeSnapshotClass / VolumeSnapshot against their CRDs' rules
             (required fields, enums, one-of, no unknown fields)
  objects    unique names, namespaces, selectors vs. template labels, mounts vs.
             volumes, $(VAR) references vs. env, pinned image tags
  rbac       every sidecar's service account holds the rules that sidecar needs
  contract   loopvol-csi flags, driver name, the CSIDriver and StorageClass
             choices of each mode, host paths consistent and equal to the settings
  examples   references between examples and the installed classes
  build      Dockerfile vs. Cargo workspace (package and binary names, version)

Prints one line per check and a closing "N passed, N failed" line; exits 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv

DRIVER = "csi.loopvol.io"
FLEX_DRIVER = "loopvol/loopvol"
NAMESPACE = "loopvol"
LOOPVOL_IMAGE = "loopvol"

# The loopvol-csi command line contract (csi/ implements it).
CSI_FLAGS_WITH_VALUE = {"--endpoint", "--node-id", "--pool", "--driver-name", "--mode",
                        "--path-prefix", "--max-volumes-per-node",
                        "--overcommit",  # implemented by csi/ too; the manifests do not pass it
                        # /metrics on IP:PORT (issue 10).
                        "--metrics-address"}
METRICS_PORT_NAME = "metrics"
CSI_BOOL_FLAGS = {"--shared-pool"}
CSI_MODES = {"controller", "node", "both"}

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass",
                  "VolumeSnapshotClass", "VolumeGroupSnapshotClass", "PersistentVolume"}
CUSTOM_KINDS = {("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
                ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
                ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotClass"),
                ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshot")}
GROUP_SNAPSHOT_GATE = "CSIVolumeGroupSnapshot"
WORKLOAD_KINDS = {"DaemonSet", "Deployment", "StatefulSet"}

QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                      r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

# ----------------------------------------------------------------- the sidecars, per version
# What each pinned sidecar release accepts and needs, written down from its README flag list,
# its main.go and its deploy/kubernetes/rbac.yaml (see deploy/README.md, "Image pins"). A pin
# without an entry here fails: bumping a sidecar means reading its release notes and adding
# the new version's entry. Keyed by image name (the last path part) and tag.
#
# RBAC rules are (apiGroup, resource, verbs, scope, when): scope "cluster", or "namespace"
# (the driver's own namespace is enough); `when` decides from the container's args whether
# the sidecar needs the rule with this command line.
Rule = tuple[str, str, set[str], str, Callable[[list[str]], bool]]


def always(_args: list[str]) -> bool:
    return True


def with_arg(arg: str) -> Callable[[list[str]], bool]:
    return lambda args: arg in args


def without_arg(arg: str) -> Callable[[list[str]], bool]:
    return lambda args: arg not in args


def feature_gate(args: list[str], gate: str) -> bool | None:
    """The value a --feature-gates argument gives `gate` (the last one wins), None if unset."""
    value = None
    for a in args:
        if a.startswith("--feature-gates="):
            for pair in a.split("=", 1)[1].split(","):
                k, _, v = pair.partition("=")
                if k.strip() == gate:
                    value = v.strip().lower() == "true"
    return value


def with_gate(gate: str) -> Callable[[list[str]], bool]:
    return lambda args: feature_gate(args, gate) is True


LEADER_ELECTION: Rule = ("coordination.k8s.io", "leases", {"get", "list", "watch", "create", "update"},
                         "namespace", with_arg("--leader-election=true"))
# Events through client-go's recorder: created, then patched as they repeat.
EVENTS: Rule = ("", "events", {"create", "patch"}, "cluster", always)


class Sidecar:
    def __init__(self, flags: set[str], deprecated: dict[str, str], rbac: list[Rule]) -> None:
        self.flags = flags            # accepted and not deprecated
        self.deprecated = deprecated  # flag -> what to use instead
        self.rbac = rbac


LEADER_FLAGS = {"--leader-election", "--leader-election-namespace", "--leader-election-lease-duration",
                "--leader-election-renew-deadline", "--leader-election-retry-period"}
COMMON_FLAGS = {"--v", "--csi-address", "--timeout", "--http-endpoint", "--metrics-path",
                "--kube-api-qps", "--kube-api-burst", "--logging-format"}

SIDECARS: dict[str, dict[str, Sidecar]] = {
    "csi-provisioner": {
        "v6.3.0": Sidecar(
            flags=COMMON_FLAGS | LEADER_FLAGS | {
                "--extra-create-metadata", "--default-fstype", "--feature-gates", "--worker-threads",
                "--retry-interval-start", "--retry-interval-max", "--strict-topology", "--immediate-topology",
                "--node-deployment", "--node-deployment-immediate-binding", "--node-deployment-base-delay",
                "--node-deployment-max-delay", "--enable-capacity", "--capacity-ownerref-level",
                "--capacity-threads", "--capacity-poll-interval", "--capacity-for-immediate-binding",
                "--volume-name-prefix", "--volume-name-uuid-length", "--cloning-protection-threads",
                "--snapshot-orphan-sweep-interval"},
            deprecated={"--metrics-address": "--http-endpoint"},
            rbac=[
                ("", "persistentvolumes", {"get", "list", "watch", "create", "patch", "delete"}, "cluster", always),
                ("", "persistentvolumeclaims", {"get", "list", "watch", "update"}, "cluster", always),
                ("storage.k8s.io", "storageclasses", {"get", "list", "watch"}, "cluster", always),
                EVENTS,
                ("", "nodes", {"get", "list", "watch"}, "cluster", always),
                ("storage.k8s.io", "csinodes", {"get", "list", "watch"}, "cluster", always),
                ("storage.k8s.io", "volumeattachments", {"get", "list", "watch"}, "cluster", always),
                # Restores: the source snapshot, protected by a finalizer while the volume is
                # made; v6.3 also sweeps orphaned finalizers from an informer (watch, update).
                ("snapshot.storage.k8s.io", "volumesnapshots", {"get", "list", "watch", "update"}, "cluster",
                 always),
                ("snapshot.storage.k8s.io", "volumesnapshotcontents", {"get", "list"}, "cluster", always),
                # CreateVolume of a claim that names a VolumeAttributesClass reads it.
                ("storage.k8s.io", "volumeattributesclasses", {"get"}, "cluster", always),
                LEADER_ELECTION,
                ("storage.k8s.io", "csistoragecapacities", {"get", "list", "watch", "create", "update", "delete"},
                 "namespace", with_arg("--enable-capacity=true")),
                # The owner of the capacity objects, found from the pod (POD_NAME) upwards.
                ("", "pods", {"get"}, "namespace", with_arg("--enable-capacity=true")),
                ("apps", "replicasets", {"get"}, "namespace", with_arg("--enable-capacity=true")),
            ]),
    },
    "csi-attacher": {
        "v4.12.0": Sidecar(
            flags=COMMON_FLAGS | LEADER_FLAGS | {
                "--worker-threads", "--retry-interval-start", "--retry-interval-max", "--reconcile-sync",
                "--default-fstype", "--max-grpc-log-length"},
            deprecated={"--metrics-address": "--http-endpoint"},
            rbac=[
                ("", "persistentvolumes", {"get", "list", "watch", "patch"}, "cluster", always),
                ("storage.k8s.io", "csinodes", {"get", "list", "watch"}, "cluster", always),
                ("storage.k8s.io", "volumeattachments", {"get", "list", "watch", "patch"}, "cluster", always),
                ("storage.k8s.io", "volumeattachments/status", {"patch"}, "cluster", always),
                LEADER_ELECTION,
            ]),
    },
    "csi-resizer": {
        "v2.2.1": Sidecar(
            flags=COMMON_FLAGS | LEADER_FLAGS | {
                "--handle-volume-inuse-error", "--workers", "--retry-interval-start", "--retry-interval-max",
                "--feature-gates", "--extra-modify-metadata", "--resync-period"},
            deprecated={"--metrics-address": "--http-endpoint"},
            rbac=[
                ("", "persistentvolumes", {"get", "list", "watch", "patch"}, "cluster", always),
                ("", "persistentvolumeclaims", {"get", "list", "watch"}, "cluster", always),
                ("", "persistentvolumeclaims/status", {"patch"}, "cluster", always),
                EVENTS,
                # ControllerModifyVolume for claims that name a VolumeAttributesClass (GA in 2.0).
                ("storage.k8s.io", "volumeattributesclasses", {"get", "list", "watch"}, "cluster", always),
                # Only to wait out "volume in use" errors, which loopvol never returns.
                ("", "pods", {"get", "list", "watch"}, "cluster", without_arg("--handle-volume-inuse-error=false")),
                LEADER_ELECTION,
            ]),
    },
    "csi-snapshotter": {
        "v8.6.0": Sidecar(
            flags=COMMON_FLAGS | LEADER_FLAGS | {
                "--extra-create-metadata", "--node-deployment", "--feature-gates", "--worker-threads",
                "--retry-interval-start", "--retry-interval-max", "--snapshot-name-prefix",
                "--snapshot-name-uuid-length", "--groupsnapshot-name-prefix", "--groupsnapshot-name-uuid-length",
                "--resync-period"},
            deprecated={"--metrics-address": "--http-endpoint",
                        "--enable-volume-group-snapshots": "--feature-gates=CSIVolumeGroupSnapshot=true"},
            rbac=[
                EVENTS,
                ("snapshot.storage.k8s.io", "volumesnapshotclasses", {"get", "list", "watch"}, "cluster", always),
                ("snapshot.storage.k8s.io", "volumesnapshotcontents", {"get", "list", "watch", "update", "patch"},
                 "cluster", always),
                ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", {"update", "patch"}, "cluster",
                 always),
                ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", {"get", "list", "watch"},
                 "cluster", with_gate("CSIVolumeGroupSnapshot")),
                ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents",
                 {"get", "list", "watch", "update", "patch"}, "cluster", with_gate("CSIVolumeGroupSnapshot")),
                ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", {"update", "patch"},
                 "cluster", with_gate("CSIVolumeGroupSnapshot")),
                LEADER_ELECTION,
            ]),
    },
    "csi-node-driver-registrar": {
        "v2.17.0": Sidecar(
            flags={"--v", "--csi-address", "--kubelet-registration-path", "--plugin-registration-path",
                   "--http-endpoint", "--timeout", "--enable-pprof", "--logging-format"},
            deprecated={"--health-port": "--http-endpoint", "--mode": "(nothing: registration needs no probe)",
                        "--connection-timeout": "(nothing: it has no effect)"},
            rbac=[]),
    },
    "csi-external-health-monitor-controller": {
        # v0.19.0 exists: it records health in PersistentVolumeClaim status.healthStatus (a
        # Kubernetes 1.37 field) instead of events; its flags and RBAC could not be checked.
        "v0.18.0": Sidecar(
            flags={"--v", "--csi-address", "--timeout", "--leader-election", "--leader-election-namespace",
                   "--monitor-interval", "--list-volumes-interval", "--volume-list-add-interval",
                   "--node-list-add-interval", "--worker-threads", "--enable-node-watcher", "--resync",
                   "--metrics-address", "--metrics-path"},
            deprecated={},
            rbac=[
                ("", "persistentvolumes", {"get", "list", "watch"}, "cluster", always),
                ("", "persistentvolumeclaims", {"get", "list", "watch"}, "cluster", always),
                ("", "pods", {"get", "list", "watch"}, "cluster", always),
                ("", "nodes", {"get", "list", "watch"}, "cluster", with_arg("--enable-node-watcher=true")),
                EVENTS,
                LEADER_ELECTION,
            ]),
    },
    "livenessprobe": {
        "v2.19.0": Sidecar(
            flags={"--v", "--csi-address", "--probe-timeout", "--http-endpoint", "--metrics-path",
                   "--logging-format"},
            deprecated={"--health-port": "--http-endpoint", "--metrics-address": "--http-endpoint"},
            rbac=[]),
    },
}
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"


def sidecar_of(container: dict) -> tuple[str, str, Sidecar | None] | None:
    """(image name, tag, its table entry) for a kubernetes-csi sidecar container, else None."""
    name, tag = image_name_tag(container.get("image") or "")
    if not name.startswith(SIDECAR_REGISTRY):
        return None
    short = name[len(SIDECAR_REGISTRY):]
    return short, tag or "", SIDECARS.get(short, {}).get(tag or "")


# --------------------------------------------------------------------------- report
class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def section(self, title: str) -> None:
        print(f"\n== {title}")

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {name}")
        else:
            self.failed += 1
            print(f"  FAIL  {name}" + (f": {detail}" if detail else ""))
        return ok

    def problems(self, name: str, problems: list[str]) -> bool:
        """One check that passes when `problems` is empty; lists them otherwise."""
        ok = self.check(name, not problems, f"{len(problems)} problem(s)" if problems else "")
        for p in problems:
            print(f"          - {p}")
        return ok


def ident(obj: dict) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


def load_yaml_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# --------------------------------------------------------------------------- schema
def schema_errors(obj: dict, version: str) -> list[str]:
    """Strict validation of a built-in object; all errors, not just the first."""
    vers = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)]
    if not vers:
        raise SystemExit(f"kubernetes-validate has no schema for Kubernetes {version}")
    schema_dir = f"v{vers[-1]}-local-strict"
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    try:
        schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{obj['kind'].lower()}-{api}.json",
                                    version)
    except FileNotFoundError:
        return [f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}"]
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(defs) @ registry
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def object_meta_errors(meta: Any, version: str) -> list[str]:
    """ObjectMeta of a custom resource, checked with the built-in (strict) schema."""
    vers = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(version)]
    schema_dir = f"v{vers[-1]}-local-strict"
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$id": "https://kubernetes.io/api/loopvol-custom-resource",
              "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    registry = referencing.Resource.from_contents(defs) @ referencing.Registry()
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"metadata.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(meta)]


# The rules of the snapshot.storage.k8s.io/v1 and groupsnapshot.storage.k8s.io/v1 CRDs
# (external-snapshotter v8.6) that a manifest can break.
def crd_errors(obj: dict, version: str) -> list[str]:
    errs: list[str] = []
    kind = obj.get("kind")
    is_class = kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass")
    allowed_top = ({"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"} if is_class
                   else {"apiVersion", "kind", "metadata", "spec", "status"})
    for key in obj:
        if key not in allowed_top:
            errs.append(f"unknown field {key!r}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        errs.append("metadata.name is required")
    else:
        errs += object_meta_errors(meta, version)
    if is_class:
        if not isinstance(obj.get("driver"), str) or not obj.get("driver"):
            errs.append("driver is required (a non-empty string)")
        if obj.get("deletionPolicy") not in ("Delete", "Retain"):
            errs.append(f"deletionPolicy is required, Delete or Retain, not {obj.get('deletionPolicy')!r}")
        params = obj.get("parameters", {})
        if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in params.items()):
            errs.append("parameters must map strings to strings")
        return errs
    group = kind == "VolumeGroupSnapshot"
    class_field = "volumeGroupSnapshotClassName" if group else "volumeSnapshotClassName"
    sources = (("selector", "volumeGroupSnapshotContentName") if group
               else ("persistentVolumeClaimName", "volumeSnapshotContentName"))
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return errs + ["spec is required"]
    for key in spec:
        if key not in ("source", class_field):
            errs.append(f"unknown field spec.{key}")
    if class_field in spec and (not isinstance(spec[class_field], str) or not spec[class_field]):
        errs.append(f"spec.{class_field} must be a non-empty string")
    source = spec.get("source")
    if not isinstance(source, dict):
        return errs + ["spec.source is required"]
    for key in source:
        if key not in sources:
            errs.append(f"unknown field spec.source.{key}")
    given = [k for k in sources if source.get(k)]
    if len(given) != 1:
        errs.append(f"spec.source needs exactly one of {', '.join(sources)}")
    selector = source.get("selector")
    if selector is not None:
        if not isinstance(selector, dict) or set(selector) - {"matchLabels", "matchExpressions"}:
            errs.append("spec.source.selector must be a label selector (matchLabels, matchExpressions)")
        elif not all(isinstance(k, str) and isinstance(v, str)
                     for k, v in (selector.get("matchLabels") or {}).items()):
            errs.append("spec.source.selector.matchLabels must map strings to strings")
    for k in sources:
        if k != "selector" and k in source and not isinstance(source[k], str):
            errs.append(f"spec.source.{k} must be a string")
    return errs


def validate_objects(r: Report, label: str, objs: list[dict], versions: list[str]) -> None:
    for obj in objs:
        if not isinstance(obj, dict) or not all(k in obj for k in ("apiVersion", "kind", "metadata")):
            r.check(f"{label}: object has apiVersion, kind, metadata", False, repr(obj)[:120])
            continue
        custom = (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS
        errs = []
        for v in versions:
            errs += [f"[{kv.major_minor(v)}] {e}" for e in (crd_errors(obj, v) if custom else schema_errors(obj, v))]
        what = "CRD rules" if custom else "strict schema"
        r.problems(f"{label}: {ident(obj)} {what} (Kubernetes {', '.join(kv.major_minor(v) for v in versions)})",
                   errs)


# --------------------------------------------------------------------------- helpers
def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in WORKLOAD_KINDS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    if obj.get("kind") == "Pod":
        return obj.get("spec") or {}
    return None


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def find(items: Iterable[dict], name: str) -> dict | None:
    return next((i for i in items or [] if i.get("name") == name), None)


def env_value(container: dict, name: str) -> str | None:
    e = find(container.get("env") or [], name)
    return None if e is None else e.get("value")


def arg_values(container: dict, flag: str) -> list[str]:
    out = []
    for a in container.get("args") or []:
        if a.startswith(flag + "="):
            out.append(a[len(flag) + 1:])
    return out


def has_arg(container: dict, arg: str) -> bool:
    return arg in (container.get("args") or [])


def expand(container: dict, value: str) -> str:
    """$(VAR) expansion as kubelet does it, from literal env values."""
    return ENV_REF.sub(lambda m: env_value(container, m.group(1)) or m.group(0), value)


def image_name_tag(image: str) -> tuple[str, str | None]:
    if "@" in image:
        return image.split("@", 1)[0], image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        return image.rsplit(":", 1)[0], image.rsplit(":", 1)[1]
    return image, None


def mount(container: dict, volume: str) -> dict | None:
    return find(container.get("volumeMounts") or [], volume)


def host_path(spec: dict, volume: str) -> str | None:
    v = find(spec.get("volumes") or [], volume)
    return None if v is None or "hostPath" not in v else v["hostPath"].get("path")


# --------------------------------------------------------------------------- generic object checks
def check_objects(r: Report, label: str, objs: list[dict], workspace_version: str,
                  require_namespace: str | None) -> None:
    seen: dict[str, int] = {}
    for o in objs:
        seen[ident(o)] = seen.get(ident(o), 0) + 1
    r.problems(f"{label}: object names unique", [f"{k} x{n}" for k, n in seen.items() if n > 1])

    ns_problems = []
    for o in objs:
        ns = (o.get("metadata") or {}).get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            if ns is not None:
                ns_problems.append(f"{ident(o)} is cluster-scoped but has a namespace")
        elif require_namespace and ns != require_namespace:
            ns_problems.append(f"{ident(o)} is not in namespace {require_namespace}")
    r.problems(f"{label}: namespaces", ns_problems)

    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        problems = []
        if o["kind"] in WORKLOAD_KINDS:
            sel = ((o["spec"].get("selector") or {}).get("matchLabels")) or {}
            labels = ((o["spec"]["template"].get("metadata") or {}).get("labels")) or {}
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                problems.append(f"selector {sel} does not match template labels {labels}")
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        ports: dict[int, str] = {}
        for c in containers(spec):
            cn = c.get("name")
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    problems.append(f"container {cn} mounts undeclared volume {m.get('name')}")
            for d in c.get("volumeDevices") or []:
                if d.get("name") not in volumes:
                    problems.append(f"container {cn} uses undeclared volume {d.get('name')}")
            env_names = {e.get("name") for e in c.get("env") or []}
            for s in list(c.get("args") or []) + list(c.get("command") or []):
                for ref in ENV_REF.findall(s):
                    if ref not in env_names:
                        problems.append(f"container {cn}: $({ref}) in {s!r} is not in its env")
            name, tag = image_name_tag(c.get("image") or "")
            if not tag or tag == "latest":
                problems.append(f"container {cn}: image {c.get('image')!r} has no pinned tag")
            if name.rsplit("/", 1)[-1] == LOOPVOL_IMAGE and tag != workspace_version:
                problems.append(f"container {cn}: loopvol image tag {tag!r} is not the workspace "
                                f"version {workspace_version!r} (Cargo.toml)")
            for p in c.get("ports") or []:
                n = p.get("containerPort")
                if n in ports:
                    problems.append(f"port {n} used by {ports[n]} and {cn}")
                ports[n] = cn
            probe = c.get("livenessProbe") or {}
            port = (probe.get("httpGet") or {}).get("port")
            if isinstance(port, str) and not any(p.get("name") == port for p in c.get("ports") or []):
                problems.append(f"container {cn}: liveness probe port {port!r} is not a port of the container")
        if o["kind"] != "Pod":
            sa = spec.get("serviceAccountName")
            if sa:
                if not any(x["kind"] == "ServiceAccount" and x["metadata"]["name"] == sa
                           and x["metadata"].get("namespace") == o["metadata"].get("namespace") for x in objs):
                    problems.append(f"service account {sa} is not part of the install")
            elif spec.get("automountServiceAccountToken") is not False:
                problems.append("no service account named, and the default one's token is mounted")
        r.problems(f"{label}: {ident(o)} pod spec consistent", problems)


# --------------------------------------------------------------------------- hardening
SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: Any) -> float | None:
    """A Kubernetes quantity as a number (cores, bytes), None if it is not one."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(value))
    if not m or m.group(2) not in SUFFIXES:
        return None
    return float(m.group(1)) * SUFFIXES[m.group(2)]


def check_hardening(r: Report, label: str, objs: list[dict]) -> None:
    """Every workload runs on Linux nodes only; every container has requests and limits for CPU
    and memory (limits at least the requests); every container that is not privileged runs
    with the RuntimeDefault seccomp profile and cannot escalate privileges."""
    for o in objs:
        if o["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(o)
        problems = []
        if (spec.get("nodeSelector") or {}).get("kubernetes.io/os") != "linux":
            problems.append("nodeSelector kubernetes.io/os: linux missing")
        pod_seccomp = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        for c in containers(spec):
            cn = c.get("name")
            res = c.get("resources") or {}
            for kind in ("cpu", "memory"):
                req = quantity((res.get("requests") or {}).get(kind))
                lim = quantity((res.get("limits") or {}).get(kind))
                if req is None or lim is None:
                    problems.append(f"{cn}: {kind} request and limit both needed, have {res}")
                elif lim < req:
                    problems.append(f"{cn}: {kind} limit below its request")
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                continue
            seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
            if seccomp != "RuntimeDefault":
                problems.append(f"{cn}: not privileged, so seccompProfile RuntimeDefault, not {seccomp}")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cn}: allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cn}: must drop ALL capabilities (and add back only what it needs)")
        r.problems(f"{label}: {ident(o)} Linux nodes, limits, seccomp RuntimeDefault where not privileged",
                   problems)


def check_disruption_budget(r: Report, label: str, mode: str, objs: list[dict]) -> None:
    """The shared-pool controller has a PodDisruptionBudget that lets drains take one replica at
    a time; DaemonSets need none (drains do not evict them)."""
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    ctrl = next((o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "loopvol-controller"),
                None)
    problems = []
    if ctrl is None:
        if pdbs:
            problems.append(f"{', '.join(ident(p) for p in pdbs)} without the controller Deployment")
    else:
        labels = ctrl["spec"]["template"]["metadata"].get("labels") or {}
        replicas = ctrl["spec"].get("replicas", 1)
        mine = [p for p in pdbs if all(labels.get(k) == v for k, v in
                                       ((p["spec"].get("selector") or {}).get("matchLabels") or {}).items())
                and (p["spec"].get("selector") or {}).get("matchLabels")]
        if len(mine) != 1:
            problems.append(f"want one PodDisruptionBudget selecting the controller's pods {labels}, found {len(mine)}")
        for p in mine:
            spec = p["spec"]
            if p["metadata"].get("namespace") != ctrl["metadata"].get("namespace"):
                problems.append(f"{ident(p)} is not in the controller's namespace")
            if spec.get("maxUnavailable") != 1 and not (isinstance(spec.get("minAvailable"), int)
                                                         and 0 < spec["minAvailable"] < replicas):
                problems.append(f"{ident(p)} must let exactly one of {replicas} replicas go "
                                f"(maxUnavailable: 1), not {spec}")
            if replicas < 2:
                problems.append(f"the controller has {replicas} replica: a budget would block every drain")
    r.problems(f"{label}: PodDisruptionBudget {'for loopvol-controller' if ctrl else 'none (DaemonSets only)'}",
               problems)


# --------------------------------------------------------------------------- RBAC
def rules_for(objs: list[dict], sa_ns: str, sa_name: str) -> list[tuple[dict, str | None]]:
    """(rule, namespace or None for cluster-wide) for every rule bound to the account."""
    roles = {(o["kind"], (o["metadata"].get("namespace")), o["metadata"]["name"]): o for o in objs
             if o["kind"] in ("Role", "ClusterRole")}
    out: list[tuple[dict, str | None]] = []
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name and s.get("namespace") == sa_ns
                   for s in b.get("subjects") or []):
            continue
        ref = b["roleRef"]
        bns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        role = roles.get((ref["kind"], bns if ref["kind"] == "Role" else None, ref["name"]))
        for rule in (role or {}).get("rules") or []:
            out.append((rule, bns))
    return out


def allows(rules: list[tuple[dict, str | None]], group: str, resource: str, verb: str, ns: str | None) -> bool:
    for rule, scope in rules:
        if scope is not None and scope != ns:
            continue
        if not ({"*", group} & set(rule.get("apiGroups") or [])):
            continue
        if not ({"*", resource} & set(rule.get("resources") or [])):
            continue
        if {"*", verb} & set(rule.get("verbs") or []):
            return True
    return False


def check_rbac(r: Report, label: str, objs: list[dict]) -> None:
    problems = []
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs
             if o["kind"] in ("Role", "ClusterRole")}
    accounts = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs
                if o["kind"] == "ServiceAccount"}
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = b["roleRef"]
        key = (ref["kind"], b["metadata"].get("namespace") if ref["kind"] == "Role" else None, ref["name"])
        if key not in roles:
            problems.append(f"{ident(b)} refers to missing {ref['kind']} {ref['name']}")
        for s in b.get("subjects") or []:
            if s.get("kind") == "ServiceAccount" and (s.get("namespace"), s.get("name")) not in accounts:
                problems.append(f"{ident(b)} binds missing ServiceAccount {s.get('namespace')}/{s.get('name')}")
    r.problems(f"{label}: bindings refer to roles and accounts that exist", problems)

    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        ns = o["metadata"].get("namespace")
        sa = spec.get("serviceAccountName")
        rules = rules_for(objs, ns, sa) if sa else []
        for c in spec.get("containers") or []:
            sc = sidecar_of(c)
            if sc is None or sc[2] is None:
                continue  # not a sidecar; an unknown version fails in check_sidecars
            args = c.get("args") or []
            needs = [rule for rule in sc[2].rbac if rule[4](args)]
            if not needs:
                continue
            missing = []
            for group, resource, verbs, scope, _ in needs:
                for verb in sorted(verbs):
                    if not allows(rules, group, resource, verb, ns if scope == "namespace" else None):
                        missing.append(f"{verb} {resource}{'.' + group if group else ''}"
                                       f"{' in ' + ns if scope == 'namespace' else ''}")
            r.problems(f"{label}: {ident(o)} {c['name']} ({sc[0]} {sc[1]}) has the API rights it needs "
                       f"(as {sa})", missing)


def check_sidecars(r: Report, label: str, objs: list[dict]) -> None:
    """Every kubernetes-csi sidecar is a pinned release this file knows, and gets only flags that
    release accepts and has not deprecated."""
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        for c in containers(spec):
            sc = sidecar_of(c)
            if sc is None:
                continue
            image, tag, known = sc
            if known is None:
                r.check(f"{label}: {ident(o)} {c['name']}: {image} {tag} is a known release", False,
                        f"no entry for {image} {tag} in check.py's SIDECARS: read its release notes, README "
                        f"flags and deploy/kubernetes/rbac.yaml, then add one")
                continue
            problems = []
            for a in c.get("args") or []:
                flag = a.split("=", 1)[0]
                if not flag.startswith("--"):
                    problems.append(f"{a!r}: not a --flag (give values as --flag=value)")
                elif flag in known.deprecated:
                    problems.append(f"{flag} is deprecated in {image} {tag}: use {known.deprecated[flag]}")
                elif flag not in known.flags:
                    problems.append(f"{flag} is not a flag of {image} {tag}")
            if c.get("command"):
                problems.append("sidecars run their image's entrypoint (no command)")
            r.problems(f"{label}: {ident(o)} {c['name']}: {image} {tag} flags", problems)


# --------------------------------------------------------------------------- loopvol contract
def loopvol_container(spec: dict) -> dict | None:
    return next((c for c in spec.get("containers") or [] if image_name_tag(c.get("image", ""))[0]
                 .rsplit("/", 1)[-1] == LOOPVOL_IMAGE and c.get("name") == "loopvol"), None)


def csi_flag_problems(c: dict) -> list[str]:
    problems = []
    for a in c.get("args") or []:
        flag = a.split("=", 1)[0]
        if flag in CSI_BOOL_FLAGS:
            if "=" in a:
                problems.append(f"{a!r}: {flag} takes no value")
        elif flag in CSI_FLAGS_WITH_VALUE:
            if "=" not in a or not a.split("=", 1)[1]:
                problems.append(f"{a!r}: {flag} needs =VALUE")
        else:
            problems.append(f"{a!r} is not a loopvol-csi flag")
    modes = arg_values(c, "--mode")
    if len(modes) != 1 or modes[0] not in CSI_MODES:
        problems.append(f"--mode must be given once, one of {sorted(CSI_MODES)}: {modes}")
    if arg_values(c, "--driver-name") != [DRIVER]:
        problems.append(f"--driver-name must be {DRIVER}")
    for flag in ("--endpoint", "--node-id", "--pool"):
        if len(arg_values(c, flag)) != 1:
            problems.append(f"{flag} must be given once")
    ep = expand(c, (arg_values(c, "--endpoint") or [""])[0])
    if not ep.startswith("unix:///"):
        problems.append(f"--endpoint {ep!r} is not unix:///PATH")
    node_env = find(c.get("env") or [], "LOOPVOL_NODE") or {}
    if (node_env.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.append("LOOPVOL_NODE must come from the downward API (spec.nodeName)")
    if (arg_values(c, "--node-id") or [""])[0] != "$(LOOPVOL_NODE)":
        problems.append("--node-id must be $(LOOPVOL_NODE)")
    return problems


def check_csi(r: Report, label: str, mode: str, objs: list[dict], settings: dict) -> None:
    kubelet_dir = settings["kubeletDir"].rstrip("/")
    pool_dir = settings["poolDir"].rstrip("/")
    shared = mode == "csi-shared"

    drivers = [o for o in objs if o["kind"] == "CSIDriver"]
    want = {"attachRequired": shared, "podInfoOnMount": True, "fsGroupPolicy": "File",
            "volumeLifecycleModes": ["Persistent"], "storageCapacity": not shared}
    problems = []
    if len(drivers) != 1 or drivers[0]["metadata"]["name"] != DRIVER:
        problems.append(f"want exactly one CSIDriver {DRIVER}")
    else:
        for k, v in want.items():
            if drivers[0]["spec"].get(k) != v:
                problems.append(f"spec.{k} is {drivers[0]['spec'].get(k)!r}, want {v!r}")
    r.problems(f"{label}: CSIDriver {DRIVER} ({'attach, no capacity' if shared else 'no attach, capacity'})",
               problems)

    problems = []
    classes = [o for o in objs if o["kind"] == "StorageClass"]
    fstypes = set()
    for sc in classes:
        n = sc["metadata"]["name"]
        p = sc.get("parameters") or {}
        if sc.get("provisioner") != DRIVER:
            problems.append(f"{n}: provisioner {sc.get('provisioner')!r}")
        if sc.get("volumeBindingMode") != "WaitForFirstConsumer":
            problems.append(f"{n}: volumeBindingMode must be WaitForFirstConsumer")
        if sc.get("allowVolumeExpansion") is not True:
            problems.append(f"{n}: allowVolumeExpansion must be true")
        if p.get("allocation") not in ("thin", "thick"):
            problems.append(f"{n}: parameter allocation must be thin or thick, is {p.get('allocation')!r}")
        for k in p:
            if k not in ("allocation", "csi.storage.k8s.io/fstype"):
                problems.append(f"{n}: unknown parameter {k}")
        fs = p.get("csi.storage.k8s.io/fstype")
        if fs is not None and fs not in ("ext4", "xfs", "btrfs"):
            problems.append(f"{n}: fstype {fs!r}")
        fstypes.add(fs)
    for need in ("ext4", "xfs", None):
        if need not in fstypes:
            problems.append(f"no StorageClass for {'raw block (no fstype)' if need is None else need}")
    r.problems(f"{label}: StorageClasses ({', '.join(sc['metadata']['name'] for sc in classes)})", problems)

    vscs = [o for o in objs if o["kind"] == "VolumeSnapshotClass"]
    r.check(f"{label}: VolumeSnapshotClass for {DRIVER}",
            len(vscs) >= 1 and all(v.get("driver") == DRIVER for v in vscs))

    node = next((o for o in objs if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "loopvol-node"), None)
    ctrl = next((o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "loopvol-controller"),
                None)
    if not r.check(f"{label}: node DaemonSet loopvol-node present", node is not None):
        return
    r.check(f"{label}: controller Deployment {'present' if shared else 'absent'}", (ctrl is not None) == shared)

    # ---- node DaemonSet
    spec = pod_spec(node)
    lv = loopvol_container(spec)
    if not r.check(f"{label}: loopvol container in loopvol-node", lv is not None):
        return
    problems = csi_flag_problems(lv)
    want_mode = "node" if shared else "both"
    if arg_values(lv, "--mode") != [want_mode]:
        problems.append(f"--mode must be {want_mode}")
    if has_arg(lv, "--shared-pool") != shared:
        problems.append(f"--shared-pool must be {'set' if shared else 'absent'}")
    prefixes = [expand(lv, p).rstrip("/") for p in arg_values(lv, "--path-prefix")]
    if prefixes != [kubelet_dir]:
        problems.append(f"--path-prefix must be the kubelet dir {kubelet_dir}: {prefixes}")
    r.problems(f"{label}: loopvol-node runs loopvol-csi --mode={want_mode}{' --shared-pool' if shared else ''}",
               problems)

    problems = []
    sc_ = lv.get("securityContext") or {}
    if sc_.get("privileged") is not True:
        problems.append("loopvol container must be privileged")
    km = mount(lv, "kubelet-dir")
    if host_path(spec, "kubelet-dir") != kubelet_dir:
        problems.append(f"kubelet-dir hostPath {host_path(spec, 'kubelet-dir')} != {kubelet_dir}")
    if not km or km.get("mountPath") != kubelet_dir or km.get("mountPropagation") != "Bidirectional":
        problems.append(f"kubelet-dir must be mounted at {kubelet_dir} with Bidirectional propagation: {km}")
    plugin_dir = f"{kubelet_dir}/plugins/{DRIVER}"
    if host_path(spec, "plugin-dir") != plugin_dir:
        problems.append(f"plugin-dir hostPath {host_path(spec, 'plugin-dir')} != {plugin_dir}")
    pm = mount(lv, "plugin-dir")
    endpoint = expand(lv, arg_values(lv, "--endpoint")[0]) if arg_values(lv, "--endpoint") else ""
    if not pm or endpoint != f"unix://{pm.get('mountPath')}/csi.sock":
        problems.append(f"--endpoint {endpoint!r} is not csi.sock in the plugin-dir mount")
    if host_path(spec, "registration-dir") != f"{kubelet_dir}/plugins_registry":
        problems.append(f"registration-dir hostPath {host_path(spec, 'registration-dir')} "
                        f"!= {kubelet_dir}/plugins_registry")
    if host_path(spec, "dev") != "/dev" or (mount(lv, "dev") or {}).get("mountPath") != "/dev":
        problems.append("the host's /dev must be mounted at /dev")
    if host_path(spec, "pool") != pool_dir or (mount(lv, "pool") or {}).get("mountPath") != pool_dir:
        problems.append(f"pool must be the host's {pool_dir} at the same path")
    if expand(lv, (arg_values(lv, "--pool") or [""])[0]) != pool_dir:
        problems.append(f"--pool must be {pool_dir}")
    reg = find(spec.get("containers"), "node-driver-registrar")
    if reg is None:
        problems.append("no node-driver-registrar")
    else:
        path = expand(reg, (arg_values(reg, "--kubelet-registration-path") or [""])[0])
        if path != f"{plugin_dir}/csi.sock":
            problems.append(f"--kubelet-registration-path {path!r} != {plugin_dir}/csi.sock")
        if (mount(reg, "registration-dir") or {}).get("mountPath") != "/registration":
            problems.append("registrar must mount registration-dir at /registration")
    if find(spec.get("containers"), "liveness-probe") is None:
        problems.append("no liveness-probe sidecar")
    r.problems(f"{label}: loopvol-node host paths match the settings (kubelet {kubelet_dir}, pool {pool_dir})",
               problems)

    problems = []
    sidecars = {c["name"] for c in spec.get("containers") or []}
    if shared:
        for n in ("csi-provisioner", "csi-resizer", "csi-snapshotter", "csi-attacher"):
            if n in sidecars:
                problems.append(f"{n} must not run on the nodes with a shared pool")
    else:
        for n in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
            if n not in sidecars:
                problems.append(f"{n} missing")
        prov = find(spec["containers"], "csi-provisioner") or {}
        for a in ("--node-deployment=true", "--enable-capacity=true"):
            if not has_arg(prov, a):
                problems.append(f"csi-provisioner needs {a}")
        if not arg_values(prov, "--capacity-ownerref-level"):
            problems.append("csi-provisioner needs --capacity-ownerref-level")
        if has_arg(prov, "--leader-election=true"):
            problems.append("csi-provisioner in node deployment must not use leader election")
        for envname, path in (("NODE_NAME", "spec.nodeName"), ("POD_NAME", "metadata.name"),
                              ("NAMESPACE", "metadata.namespace")):
            e = find(prov.get("env") or [], envname) or {}
            if (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != path:
                problems.append(f"csi-provisioner needs env {envname} from {path}")
        snap = find(spec["containers"], "csi-snapshotter") or {}
        if not has_arg(snap, "--node-deployment=true"):
            problems.append("csi-snapshotter needs --node-deployment=true")
        e = find(snap.get("env") or [], "NODE_NAME") or {}
        if (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
            problems.append("csi-snapshotter needs env NODE_NAME from spec.nodeName")
        res = find(spec["containers"], "csi-resizer") or {}
        if not has_arg(res, "--leader-election=true"):
            problems.append("csi-resizer on every node needs --leader-election=true")
    for c in spec.get("containers") or []:
        if c["name"].startswith("csi-") or c["name"] in ("node-driver-registrar", "liveness-probe"):
            if (c.get("securityContext") or {}).get("privileged"):
                problems.append(f"sidecar {c['name']} is privileged")
            if not any(m.get("mountPath") == "/csi" for m in c.get("volumeMounts") or []) or \
                    "--csi-address=/csi/csi.sock" not in (c.get("args") or []):
                problems.append(f"sidecar {c['name']} must use /csi/csi.sock")
    r.problems(f"{label}: loopvol-node sidecars for the {'shared' if shared else 'node-local'} layout", problems)

    # ---- controller Deployment (shared pool)
    if ctrl is not None:
        cspec = pod_spec(ctrl)
        clv = loopvol_container(cspec)
        problems = csi_flag_problems(clv) if clv else ["no loopvol container"]
        if clv:
            if arg_values(clv, "--mode") != ["controller"]:
                problems.append("--mode must be controller")
            if not has_arg(clv, "--shared-pool"):
                problems.append("--shared-pool must be set")
            if host_path(cspec, "pool") != pool_dir or (mount(clv, "pool") or {}).get("mountPath") != pool_dir \
                    or expand(clv, (arg_values(clv, "--pool") or [""])[0]) != pool_dir:
                problems.append(f"pool must be the host's {pool_dir} at the same path")
            if (cspec.get("volumes") and (find(cspec["volumes"], "pool") or {}).get("hostPath", {})
                    .get("type") != "Directory"):
                problems.append("shared pool hostPath must be type Directory (never created empty)")
        names = {c["name"] for c in cspec.get("containers") or []}
        for n in ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"):
            if n not in names:
                problems.append(f"{n} missing")
            elif n != "liveness-probe" and not has_arg(find(cspec["containers"], n), "--leader-election=true"):
                problems.append(f"{n} needs --leader-election=true")
        r.problems(f"{label}: loopvol-controller runs loopvol-csi --mode=controller --shared-pool "
                   f"with leader-elected sidecars", problems)
        r.check(f"{label}: node pool hostPath is type Directory with a shared pool",
                (find(spec["volumes"], "pool") or {}).get("hostPath", {}).get("type") == "Directory")


CONTROLLER_SIDECARS_LABEL = "csi.loopvol.io/controller-sidecars"


def check_controller_sidecars_label(r: Report, label: str, mode: str, objs: list[dict]) -> None:
    """The label optional components select workloads by: on the workload that runs the
    controller-side sidecars, saying how (per-node, leader-elected), and on no other."""
    want = ({("Deployment", "loopvol-controller"): "leader-elected"} if mode == "csi-shared"
            else {("DaemonSet", "loopvol-node"): "per-node"})
    got = {(o["kind"], o["metadata"]["name"]): (o["metadata"].get("labels") or {}).get(CONTROLLER_SIDECARS_LABEL)
           for o in objs if o["kind"] in WORKLOAD_KINDS}
    problems = [f"{k[0]}/{k[1]}: {CONTROLLER_SIDECARS_LABEL}={v!r}, want {want.get(k)!r}"
                for k, v in got.items() if v != want.get(k)]
    problems += [f"{k[0]}/{k[1]} missing" for k in want if k not in got]
    r.problems(f"{label}: {CONTROLLER_SIDECARS_LABEL} marks {', '.join(f'{k[1]}={v}' for k, v in want.items())} "
               f"only", problems)


def check_group_snapshots(r: Report, label: str, objs: list[dict], enabled: bool) -> None:
    """Group snapshots end to end: every csi-snapshotter runs with the CSIVolumeGroupSnapshot gate
    and the install has a default VolumeGroupSnapshotClass for the driver (its RBAC is in the
    snapshotter's table); or, with components/without-group-snapshots, neither."""
    problems = []
    snapshotters = [(o, c) for o in objs if pod_spec(o) is not None for c in containers(pod_spec(o))
                    if (sidecar_of(c) or ("",))[0] == "csi-snapshotter"]
    if not snapshotters:
        problems.append("no csi-snapshotter")
    for o, c in snapshotters:
        gate = feature_gate(c.get("args") or [], GROUP_SNAPSHOT_GATE)
        if gate is not enabled:
            problems.append(f"{ident(o)} {c['name']}: --feature-gates {GROUP_SNAPSHOT_GATE}={gate}, want {enabled}")
    classes = [o for o in objs if o["kind"] == "VolumeGroupSnapshotClass"]
    if enabled:
        if len(classes) != 1:
            problems.append(f"want one VolumeGroupSnapshotClass, found {len(classes)}")
        for vgsc in classes:
            if vgsc.get("driver") != DRIVER:
                problems.append(f"{ident(vgsc)}: driver {vgsc.get('driver')!r}")
            if vgsc.get("apiVersion") != "groupsnapshot.storage.k8s.io/v1":
                problems.append(f"{ident(vgsc)}: apiVersion {vgsc.get('apiVersion')} (v1 is what csi-snapshotter "
                                f"v8.6 uses)")
            ann = (vgsc["metadata"].get("annotations") or {})
            if ann.get("groupsnapshot.storage.kubernetes.io/is-default-class") != "true":
                problems.append(f"{ident(vgsc)} is not the default group snapshot class")
    elif classes:
        problems.append(f"{', '.join(ident(c) for c in classes)} installed without group snapshots")
    r.problems(f"{label}: group snapshots {'wired end to end (gate, default class)' if enabled else 'switched off'}",
               problems)


HEALTH_MONITOR_IMAGE = "csi-external-health-monitor-controller"


def check_health_monitor(r: Report, label: str, objs: list[dict], enabled: bool) -> None:
    """components/health-monitor: the monitor runs next to the controller service only, on every
    node without leader election (node-local: each copy reports its own pool) or leader-elected
    in the controller Deployment; without the component, nowhere."""
    problems = []
    found = 0
    for o in objs:
        spec = pod_spec(o)
        if spec is None:
            continue
        how = (o["metadata"].get("labels") or {}).get(CONTROLLER_SIDECARS_LABEL)
        for c in containers(spec):
            if (sidecar_of(c) or ("",))[0] != HEALTH_MONITOR_IMAGE:
                continue
            found += 1
            args = c.get("args") or []
            if not enabled:
                problems.append(f"{ident(o)} runs {c['name']} without the component")
            elif how is None:
                problems.append(f"{ident(o)} runs {c['name']} but no controller service")
            elif (how == "leader-elected") != ("--leader-election=true" in args):
                problems.append(f"{ident(o)} ({how}): {c['name']} leader election "
                                f"{'missing' if how == 'leader-elected' else 'would leave all nodes but one unwatched'}")
            if "--csi-address=/csi/csi.sock" not in args or (mount(c, "plugin-dir") or mount(c, "socket-dir")
                                                               or {}).get("mountPath") != "/csi":
                problems.append(f"{ident(o)} {c['name']} must use the driver's socket /csi/csi.sock")
            if any(a.startswith("--enable-node-watcher") and not a.endswith("=false") for a in args):
                problems.append(f"{ident(o)} {c['name']}: the node watcher would report each failed node from "
                                f"every copy")
    if enabled and found != 1:
        problems.append(f"want the monitor in exactly one workload, found {found}")
    r.problems(f"{label}: external-health-monitor-controller {'next to the controller service' if enabled else 'absent'}",
               problems)


def check_metrics(r: Report, label: str, mode: str, objs: list[dict]) -> None:
    """Every loopvol-csi serves /metrics on --metrics-address=IP:PORT, a container port named
    `metrics` is that port, and in the shared-pool layout a Service reaches the controller's."""
    problems = []
    ports: dict[str, int] = {}
    for o in objs:
        spec = pod_spec(o)
        lv = loopvol_container(spec) if spec is not None and o["kind"] in WORKLOAD_KINDS else None
        if lv is None:
            continue
        what = f"{ident(o)} {lv['name']}"
        values = arg_values(lv, "--metrics-address")
        if len(values) != 1:
            problems.append(f"{what}: --metrics-address given {len(values)} times")
            continue
        host, _, port = values[0].rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            if not (host.startswith("[") == host.endswith("]") == (":" in host)):
                raise ValueError("IPv6 needs brackets")
            port_no = int(port)
            if not 0 < port_no < 65536:
                raise ValueError("port")
        except ValueError:
            problems.append(f"{what}: --metrics-address={values[0]} is not IP:PORT (what SocketAddr parses)")
            continue
        named = [p for p in lv.get("ports") or [] if p.get("name") == METRICS_PORT_NAME]
        if len(named) != 1 or named[0].get("containerPort") != port_no or named[0].get("protocol", "TCP") != "TCP":
            problems.append(f"{what}: want one TCP container port named {METRICS_PORT_NAME} = {port_no}, have {named}")
        ports[o["kind"]] = port_no
    want = {"DaemonSet", "Deployment"} if mode == "csi-shared" else {"DaemonSet"}
    if set(ports) != want:
        problems.append(f"loopvol-csi serves metrics in {sorted(ports)}, want {sorted(want)}")
    ctrl = next((o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "loopvol-controller"),
                None)
    services = [o for o in objs if o["kind"] == "Service"]
    if ctrl is not None:
        def template_labels(o: dict) -> dict:
            return o["spec"]["template"]["metadata"].get("labels") or {}

        def selects(selector: dict, labels: dict) -> bool:
            return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

        others = [o for o in objs if o["kind"] in WORKLOAD_KINDS and o is not ctrl]
        mine = []
        for svc in services:
            sel = svc["spec"].get("selector") or {}
            if not selects(sel, template_labels(ctrl)):
                continue
            mine.append(svc)
            for o in others:
                if selects(sel, template_labels(o)):
                    problems.append(f"{ident(svc)} also selects the pods of {ident(o)}")
            if not any(p.get("name") == METRICS_PORT_NAME
                       and p.get("targetPort") in (METRICS_PORT_NAME, ports.get("Deployment"))
                       for p in svc["spec"].get("ports") or []):
                problems.append(f"{ident(svc)} has no port {METRICS_PORT_NAME} to the containers' metrics port")
        if len(mine) != 1:
            problems.append(f"want one Service for the controller's metrics, found {len(mine)}")
    elif services:
        problems.append(f"unexpected {', '.join(ident(s_) for s_ in services)}")
    r.problems(f"{label}: /metrics port {sorted(set(ports.values()))} in {', '.join(sorted(ports))}"
               f"{' and a Service for the controller' if ctrl is not None else ''}", problems)


def check_flexvolume(r: Report, label: str, objs: list[dict], settings: dict, installer_path: str) -> None:
    ds = next((o for o in objs if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "loopvol-flexvolume"), None)
    if not r.check(f"{label}: installer DaemonSet loopvol-flexvolume present", ds is not None):
        return
    spec = pod_spec(ds)
    c = find(spec.get("containers"), "install") or {}
    plugin_dir = settings["pluginDir"].rstrip("/")
    problems = []
    if c.get("command") != [installer_path]:
        problems.append(f"command {c.get('command')} is not [{installer_path}]")
    if host_path(spec, "plugin-dir") != plugin_dir:
        problems.append(f"plugin-dir hostPath {host_path(spec, 'plugin-dir')} != {plugin_dir}")
    if (mount(c, "plugin-dir") or {}).get("mountPath") != env_value(c, "PLUGIN_DIR"):
        problems.append("PLUGIN_DIR must be where plugin-dir is mounted")
    for env, key in (("LOOPVOL_ATTACH", "attach"), ("LOOPVOL_POOL", "poolDir"), ("LOOPVOL_LOG", "logFile")):
        if env_value(c, env) != settings[key]:
            problems.append(f"{env}={env_value(c, env)!r}, settings say {settings[key]!r}")
    pool_dir = settings["poolDir"].rstrip("/")
    if host_path(spec, "pool") != pool_dir or (mount(c, "pool") or {}).get("mountPath") != pool_dir:
        problems.append(f"pool hostPath/mount must be {pool_dir} (kubelet creates it on every node)")
    if settings["attach"] not in ("true", "false"):
        problems.append(f"setting attach must be \"true\" or \"false\", not {settings['attach']!r}")
    e = find(c.get("env") or [], "LOOPVOL_NODE") or {}
    if (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.append("LOOPVOL_NODE must come from spec.nodeName")
    if not any(t.get("operator") == "Exists" and not t.get("key") for t in spec.get("tolerations") or []):
        problems.append("must tolerate every taint (control-plane nodes run the controller-manager)")
    r.problems(f"{label}: installer writes the settings (plugin dir {plugin_dir})", problems)


# --------------------------------------------------------------------------- examples
def check_examples(r: Report, objs: list[dict], installed: list[dict]) -> None:
    scs = {o["metadata"]["name"] for o in installed if o["kind"] == "StorageClass"}
    vscs = {o["metadata"]["name"] for o in installed if o["kind"] == "VolumeSnapshotClass"}
    vgscs = {o["metadata"]["name"] for o in installed if o["kind"] == "VolumeGroupSnapshotClass"}
    claim_labels = {o["metadata"]["name"]: o["metadata"].get("labels") or {} for o in objs
                    if o["kind"] == "PersistentVolumeClaim"}
    pvcs = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    pvs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolume"}
    snaps = {o["metadata"]["name"] for o in objs if o["kind"] == "VolumeSnapshot"}
    problems = []
    for o in objs:
        k, n = o["kind"], ident(o)
        if k == "PersistentVolumeClaim":
            sc = o["spec"].get("storageClassName")
            if sc != "" and sc not in scs:
                problems.append(f"{n}: storageClassName {sc!r} is not installed by the CSI overlays")
            ds = o["spec"].get("dataSource")
            if ds:
                if ds.get("kind") == "VolumeSnapshot" and ds.get("name") not in snaps:
                    problems.append(f"{n}: restores from unknown snapshot {ds.get('name')}")
                if ds.get("kind") == "PersistentVolumeClaim" and ds.get("name") not in pvcs:
                    problems.append(f"{n}: clones unknown claim {ds.get('name')}")
            vn = o["spec"].get("volumeName")
            if vn and vn not in pvs:
                problems.append(f"{n}: volumeName {vn} is not an example PV")
        elif k == "VolumeSnapshot":
            cls = (o.get("spec") or {}).get("volumeSnapshotClassName")
            if cls is not None and cls not in vscs:
                problems.append(f"{n}: volumeSnapshotClassName {cls!r} is not installed")
            src = ((o.get("spec") or {}).get("source") or {}).get("persistentVolumeClaimName")
            if src and src not in pvcs:
                problems.append(f"{n}: snapshots unknown claim {src}")
        elif k == "VolumeGroupSnapshot":
            cls = (o.get("spec") or {}).get("volumeGroupSnapshotClassName")
            if cls is not None and cls not in vgscs:
                problems.append(f"{n}: volumeGroupSnapshotClassName {cls!r} is not installed")
            selector = (((o.get("spec") or {}).get("source") or {}).get("selector") or {})
            want = selector.get("matchLabels") or {}
            members = [c for c, labels in claim_labels.items() if all(labels.get(k) == v for k, v in want.items())]
            if not want or len(members) < 2:
                problems.append(f"{n}: its selector {selector} picks {members}, not a group of example claims")
        elif k == "PersistentVolume" and "flexVolume" in o["spec"]:
            fv = o["spec"]["flexVolume"]
            if fv.get("driver") != FLEX_DRIVER:
                problems.append(f"{n}: flexVolume.driver must be {FLEX_DRIVER}")
            if fv.get("fsType") not in ("ext4", "xfs", "btrfs"):
                problems.append(f"{n}: flexVolume.fsType {fv.get('fsType')!r}")
            opts = fv.get("options") or {}
            vid = opts.get("volumeID", "")
            if not vid or "/" in vid or ".." in vid or "\0" in vid or len(vid.encode()) > 128:
                problems.append(f"{n}: options.volumeID {vid!r} is not a valid loopvol volume ID")
            if "size" in opts and not QUANTITY.match(opts["size"]):
                problems.append(f"{n}: options.size {opts['size']!r} is not a Kubernetes quantity")
        spec = pod_spec(o)
        if spec is not None:
            for v in spec.get("volumes") or []:
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and claim not in pvcs:
                    problems.append(f"{n}: uses unknown claim {claim}")
            for c in containers(spec):
                if not image_name_tag(c.get("image", ""))[1]:
                    problems.append(f"{n}: image {c.get('image')!r} has no pinned tag")
    r.problems("examples: references resolve (classes, claims, snapshots, PVs) and are well-formed", problems)


# --------------------------------------------------------------------------- build
def check_build(r: Report, repo: Path) -> tuple[str, str]:
    problems = []
    root = tomllib.loads((repo / "Cargo.toml").read_text())
    version = root.get("workspace", {}).get("package", {}).get("version", "")
    bins = {}
    for member in root.get("workspace", {}).get("members", []):
        t = tomllib.loads((repo / member / "Cargo.toml").read_text())
        pkg = t.get("package", {}).get("name")
        bins[pkg] = {b.get("name") for b in t.get("bin", [])} or {pkg}
    for pkg, binary in (("loopvol-csi", "loopvol-csi"), ("loopvol-flexvolume", "loopvol-flexvolume"),
                        ("loopvol-admin", "loopvol")):
        if pkg not in bins:
            problems.append(f"workspace has no package {pkg}")
        elif binary not in bins[pkg]:
            problems.append(f"package {pkg} builds no binary {binary}: {sorted(bins[pkg])}")
    df = (repo / "deploy" / "Dockerfile").read_text()
    for needle, why in (("-p loopvol-csi", "builds loopvol-csi"),
                        ("-p loopvol-admin", "builds the admin CLI loopvol"),
                        ("COPY --from=builder /out/loopvol /usr/local/bin/", "the admin CLI in /usr/local/bin"),
                        ("--target x86_64-unknown-linux-musl -p loopvol-flexvolume", "builds a musl FlexVolume"),
                        ("debian:${DEBIAN_RELEASE}-slim", "runtime from debian slim"),
                        ("ARG DEBIAN_RELEASE=bookworm", "bookworm"),
                        ("COPY --from=builder /out/loopvol-csi /out/loopvol-flexvolume /usr/local/bin/",
                         "both binaries in /usr/local/bin")):
        if needle not in df:
            problems.append(f"Dockerfile: {why} ({needle!r} not found)")
    m = re.search(r"apt-get install[^\n]*\\\n\s*([^\n]*)", df.split("FROM debian", 1)[-1])
    pkgs = set(m.group(1).replace("\\", " ").split()) if m else set()
    for p in ("e2fsprogs", "xfsprogs", "btrfs-progs", "util-linux"):
        if p not in pkgs:
            problems.append(f"Dockerfile runtime does not install {p}")
    m = re.search(r"COPY --chmod=0755 (\S+) (\S+)", df)
    installer = m.group(2) if m else ""
    if not m or not (repo / m.group(1)).is_file():
        problems.append("Dockerfile must COPY deploy/flexvolume/install.sh (which must exist)")
    r.problems(f"build: Dockerfile matches the workspace (version {version})", problems)
    return version, installer


# --------------------------------------------------------------------------- image pins
IMAGE_LINE = re.compile(r"^\s*-?\s*image:\s*[\"']?([^\s\"']+)", re.M)


def check_pins(r: Report, repo: Path, rendered: list[tuple[str, list[dict]]]) -> None:
    """Image tags are pinned in one place: the images list of base/kustomization.yaml. The
    manifests name images without a tag, every rendered container runs the pinned tag, every
    pinned sidecar is a release check.py knows, and deploy/README.md lists the pins."""
    tree = repo / "deploy" / "kubernetes"
    base = tree / "base" / "kustomization.yaml"
    entries = load_yaml_docs(base)[0].get("images") or []
    pins: dict[str, str] = {}
    problems = []
    for e in entries:
        name, tag = e.get("name"), e.get("newTag")
        if name in pins:
            problems.append(f"{name} pinned twice")
        if not tag or tag == "latest" or set(e) - {"name", "newTag"}:
            problems.append(f"{name}: want exactly name and a newTag that is a release, not {e}")
        pins[name] = tag
    r.problems(f"pins: {len(pins)} images pinned in {base.relative_to(repo)}, each once", problems)

    problems = []
    for f in sorted(tree.rglob("*.yaml")):
        if f == base:
            continue
        for m in IMAGE_LINE.finditer(f.read_text()):
            name, tag = image_name_tag(m.group(1))
            if tag:
                problems.append(f"{f.relative_to(repo)}: {m.group(1)} has a tag (pin it in base instead)")
            elif name not in pins:
                problems.append(f"{f.relative_to(repo)}: {name} is not pinned in base")
    r.problems("pins: the manifests name images without a tag", problems)

    problems = []
    for label, objs in rendered:
        for o in objs:
            spec = pod_spec(o)
            for c in containers(spec) if spec is not None else []:
                name, tag = image_name_tag(c.get("image") or "")
                if pins.get(name) != tag:
                    problems.append(f"{label}: {ident(o)} {c.get('name')} runs {c.get('image')}, "
                                    f"pinned is {pins.get(name)}")
    r.problems("pins: every rendered container runs its pinned tag", problems)

    readme = (repo / "deploy" / "README.md").read_text()
    problems = []
    for name, tag in pins.items():
        if not name.startswith(SIDECAR_REGISTRY):
            continue
        short = name[len(SIDECAR_REGISTRY):]
        if tag not in SIDECARS.get(short, {}):
            problems.append(f"{short} {tag}: no entry in check.py's SIDECARS (flags and RBAC of that release)")
        if f"{short} {tag}" not in readme:
            problems.append(f"deploy/README.md does not list {short} {tag}")
    r.problems("pins: every pinned sidecar release is known here and listed in deploy/README.md", problems)


# --------------------------------------------------------------------------- files
def kustomization_files(directory: Path, seen: set[Path]) -> None:
    """Every file the kustomization in `directory` reads: its resources, components and patch
    files, recursively (what kustomize itself reads; generators are not used here)."""
    kfile = directory / "kustomization.yaml"
    if kfile in seen:
        return
    seen.add(kfile)
    k = load_yaml_docs(kfile)[0]
    refs = list(k.get("resources") or []) + list(k.get("components") or [])
    refs += [p["path"] for p in k.get("patches") or [] if isinstance(p, dict) and "path" in p]
    for ref in refs:
        path = (directory / ref).resolve()
        if path.is_dir():
            kustomization_files(path, seen)
        else:
            seen.add(path)


def check_manifests_used(r: Report, repo: Path, overlay_dirs: list[Path]) -> None:
    """Every manifest under deploy/kubernetes is part of some rendered variant, so none escapes
    the checks (a component no variant uses would never be validated)."""
    used: set[Path] = set()
    for d in overlay_dirs:
        kustomization_files(d.resolve(), used)
    tree = (repo / "deploy" / "kubernetes").resolve()
    unused = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.yaml") if p.resolve() not in used)
    r.problems(f"every manifest under deploy/kubernetes is rendered by some variant "
               f"({len([p for p in used if p.is_relative_to(tree)])} files)", unused)


# --------------------------------------------------------------------------- main
def guarded(r: Report, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a group of checks; a crash (say, on a malformed object) is one failed check."""
    try:
        return fn(r, *args)
    except Exception as e:  # noqa: BLE001 - report and go on with the other checks
        r.check(f"{what}: checks ran to the end", False, f"{type(e).__name__}: {e}")
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--renders", type=Path, required=True,
                    help="renders.tsv of `validate.sh render`: NAME MODE COMPONENTS RENDERED SETTINGS OVERLAY "
                         "per line (MODE: csi-local | csi-shared | flexvolume; COMPONENTS: optional components "
                         "added, comma-separated, or -)")
    ap.add_argument("--examples", nargs="*", type=Path, default=[])
    ap.add_argument("--k8s-version", action="append", default=[])
    args = ap.parse_args()
    versions = args.k8s_version or ["1.30.0"]
    for v in versions:
        if kv.major_minor(v.lstrip("v")) > kv.latest_version():
            raise SystemExit(f"kubernetes-validate {kv.latest_version()} has no schemas for {v}")

    r = Report()
    r.section("build")
    version, installer = guarded(r, "build", check_build, args.repo) or ("?", "?")

    installed: list[dict] = []
    overlay_dirs: list[Path] = []
    rendered_objs: list[tuple[str, list[dict]]] = []
    for line in args.renders.read_text().splitlines():
        name, mode, components, rendered, settings_file, overlay = line.split("\t")
        overlay_dirs.append(Path(overlay))
        label = name
        r.section(f"{label}: {rendered}")
        objs = load_yaml_docs(Path(rendered))
        rendered_objs.append((label, objs))
        settings = next(d for d in load_yaml_docs(Path(settings_file)) if d.get("kind") == "ConfigMap")["data"]
        r.check(f"{label}: rendered {len(objs)} objects: "
                + ", ".join(sorted({o.get('kind', '?') for o in objs})), len(objs) > 0)
        r.check(f"{label}: settings ConfigMap not in the output (local-config)",
                not any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == "loopvol-settings" for o in objs))
        guarded(r, label, validate_objects, label, objs, versions)
        guarded(r, label, check_objects, label, objs, version, NAMESPACE)
        guarded(r, label, check_rbac, label, objs)
        guarded(r, label, check_sidecars, label, objs)
        guarded(r, label, check_hardening, label, objs)
        guarded(r, label, check_disruption_budget, label, mode, objs)
        extra = set() if components == "-" else set(components.split(","))
        if mode in ("csi-local", "csi-shared"):
            guarded(r, label, check_csi, label, mode, objs, settings)
            guarded(r, label, check_controller_sidecars_label, label, mode, objs)
            guarded(r, label, check_group_snapshots, label, objs, "without-group-snapshots" not in extra)
            guarded(r, label, check_health_monitor, label, objs, "health-monitor" in extra)
            guarded(r, label, check_metrics, label, mode, objs)
            installed += objs
        elif mode == "flexvolume":
            guarded(r, label, check_flexvolume, label, objs, settings, installer)
        else:
            r.check(f"{label}: known mode", False, mode)

    r.section("files and pins")
    guarded(r, "files", check_manifests_used, args.repo, overlay_dirs)
    guarded(r, "pins", check_pins, args.repo, rendered_objs)

    if args.examples:
        r.section("examples")
        ex: list[dict] = []
        for f in args.examples:
            docs = load_yaml_docs(f)
            guarded(r, f"examples/{f.name}", validate_objects, f"examples/{f.name}", docs, versions)
            ex += docs
        guarded(r, "examples", check_objects, "examples", ex, version, None)
        guarded(r, "examples", check_examples, ex, installed)

    print(f"\ncheck: {r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
