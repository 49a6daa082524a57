"""Renders deploy/k8s's kustomizations without the kustomize binary, for the offline tests.

It implements exactly the subset the overlays use, and refuses anything else (so an overlay that grows a new
kustomize feature fails the tests instead of being rendered wrong):

- `resources`: YAML files (several documents each) and folders holding a kustomization.yaml;
- `images`: `name` -> `newName` / `newTag` / `digest` on containers and initContainers of pod templates;
- `patches` with only `path`: strategic-merge patches, each applied to the resource of the same kind and name.
  Maps merge key by key (null deletes), lists of maps merge by their Kubernetes patch merge key (containers and
  volumes by name, volumeMounts by mountPath, ...), every other list is replaced whole, as the API server does.

Checked against `kubectl kustomize` (kustomize v5.5) on these overlays when it was written. Usage, to see what a
cluster would get:  python deploy/tests/kustomize_lite.py deploy/k8s/overlays/gpu
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}

# patchMergeKey of the list fields the overlays may touch (Kubernetes API types); other lists are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "envFrom": None,
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def load_documents(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _key(resource: dict) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":
        # containerPort in a container, port in a Service.
        if all(isinstance(i, dict) and "containerPort" in i for i in items):
            return "containerPort"
        if all(isinstance(i, dict) and "port" in i for i in items):
            return "port"
        return None
    return MERGE_KEYS.get(field)


def strategic_merge(target, patch, field: str = ""):
    """`patch` merged into a copy of `target` (see the module's docstring for the rules)."""
    if isinstance(patch, dict):
        if "$patch" in patch or any(k.startswith("$") for k in patch):
            raise ValueError(f"unsupported patch directive in {field or 'the patch'}: {sorted(patch)}")
        out = copy.deepcopy(target) if isinstance(target, dict) else {}
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list):
        key = _merge_key(field, patch)
        if key is None or not isinstance(target, list):
            return copy.deepcopy(patch)
        out = copy.deepcopy(target)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise ValueError(f"an item of {field} in a patch has no {key}: {item!r}")
            for i, existing in enumerate(out):
                if isinstance(existing, dict) and existing.get(key) == item[key]:
                    out[i] = strategic_merge(existing, item, field)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, digest = (image.split("@", 1) + [None])[:2]
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def set_images(resources: list[dict], images: list[dict]) -> None:
    for r in resources:
        if r["kind"] not in POD_TEMPLATE_KINDS:
            continue
        pod = r["spec"]["template"]["spec"]
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag, digest = _split_image(c["image"])
            for img in images:
                unknown = set(img) - {"name", "newName", "newTag", "digest"}
                if unknown:
                    raise ValueError(f"unsupported images keys {sorted(unknown)}")
                if img["name"] != name:
                    continue
                name = img.get("newName", name)
                if "digest" in img:
                    tag, digest = None, img["digest"]
                elif "newTag" in img:
                    tag, digest = str(img["newTag"]), None
            c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def render(folder: Path) -> list[dict]:
    """The resources `kubectl kustomize folder` would print, in the order of the kustomization's resources."""
    folder = Path(folder)
    k = load_documents(folder / "kustomization.yaml")[0]
    unsupported = set(k) - SUPPORTED_KEYS
    if unsupported:
        raise ValueError(f"{folder}/kustomization.yaml uses {sorted(unsupported)}, which kustomize_lite does not "
                         f"render; keep overlays to {sorted(SUPPORTED_KEYS)} or extend deploy/tests/kustomize_lite.py")
    resources: list[dict] = []
    for entry in k.get("resources", []):
        p = folder / entry
        resources.extend(render(p) if p.is_dir() else load_documents(p))
    seen: set[tuple[str, str]] = set()
    for r in resources:
        if _key(r) in seen:
            raise ValueError(f"{folder}: {r['kind']} {r['metadata']['name']} is defined twice")
        seen.add(_key(r))
    for patch_entry in k.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{folder}: only `patches: - path: FILE` is supported, got {patch_entry}")
        for patch in load_documents(folder / patch_entry["path"]):
            matches = [i for i, r in enumerate(resources) if _key(r) == _key(patch)]
            if len(matches) != 1:
                raise ValueError(f"{folder}/{patch_entry['path']}: no resource {_key(patch)} to patch")
            i = matches[0]
            if resources[i]["apiVersion"] != patch["apiVersion"]:
                raise ValueError(f"{folder}/{patch_entry['path']}: apiVersion {patch['apiVersion']} does not match "
                                 f"{resources[i]['apiVersion']}")
            resources[i] = strategic_merge(resources[i], patch)
    set_images(resources, k.get("images", []))
    return resources


if __name__ == "__main__":
    yaml.safe_dump_all(render(Path(sys.argv[1])), sys.stdout, sort_keys=False)
