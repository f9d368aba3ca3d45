"""Checks of the deployment files under deploy/: the Dockerfile, compose.yaml and the
Kubernetes manifests (deploy/k8s/), without Docker, a cluster or the network.

- Every YAML file under deploy/ parses.
- The kustomizations (base, overlays, the KEDA component) are rendered by a small renderer
  below that supports exactly the features they use (resources, components, namespace,
  images, replicas, strategic-merge patches) and fails on anything else; every listed file
  must exist and every patch must hit exactly one resource. When `kubectl` is on PATH its
  built-in kustomize renders the same directories and must give the same objects.
- Every core Kubernetes object (rendered, plus base/secret.example.yaml) is validated in strict
  mode against the official Kubernetes JSON schemas bundled in the `kubernetes-validate` PyPI
  package (no download at test time), for the oldest and newest versions listed below.
- Cross-references: Services, probes, the PodDisruptionBudget, Secrets and ConfigMaps, worker
  memory (limit vs --memory-limit), shutdown grace, the non-root user, KEDA's query against the
  schema in migrations/.
- compose.yaml: images built from deploy/docker/Dockerfile or pinned, depends_on targets,
  secrets and volumes defined, and every `shardpress` invocation (command, healthcheck, shell
  script) names a real subcommand with real flags and SHARDPRESS_* variables.
- The Dockerfile: builder command, every workspace member in the dependency layer, the final
  stage's base, packages, non-root USER and ENTRYPOINT, and the ignore file.

Subcommands, flags and SHARDPRESS_* variables come from `$SHARDPRESS_BIN --help` when the
SHARDPRESS_BIN environment variable names a built `shardpress`; otherwise from the clap
definitions in cli/src (a regex reading of `#[arg(...)]` fields and `#[command(flatten)]`
structs). With SHARDPRESS_BIN set, a further test checks that the two readings agree.

Needs PyYAML and kubernetes-validate: run scripts/python-env.sh and use its python.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
KUSTOMIZATIONS = ["base", "overlays/example", "overlays/example-keda"]
# Oldest version we claim (native gRPC probes are GA since 1.27) and the newest bundled one.
K8S_VERSIONS = ["1.27.0", "latest"]
MIB = 1 << 20
# README "Memory": allow about 64 MiB more than --memory-limit for the process itself.
PROCESS_ALLOWANCE = 64 * MIB
# deploy/k8s/base/worker-deployment.yaml: container limit >= (limit + 64 MiB) x 1.25.
MEMORY_HEADROOM = 1.25

SETUP_HINT = "run `bash scripts/python-env.sh` and use the python it prints"
try:
    import yaml
except ImportError as e:  # pragma: no cover - exercised only without the venv
    yaml = None
    YAML_ERROR = e
try:
    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils
except ImportError as e:  # pragma: no cover
    kubernetes_validate = None
    KV_ERROR = e


def need_yaml(test: unittest.TestCase):
    if yaml is None:
        test.fail(f"PyYAML is not installed ({YAML_ERROR}): {SETUP_HINT}")


def need_validator(test: unittest.TestCase):
    if kubernetes_validate is None:
        test.fail(f"kubernetes-validate is not installed ({KV_ERROR}): {SETUP_HINT}")


def load_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path):
    docs = load_docs(path)
    if len(docs) != 1:
        raise AssertionError(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


# --------------------------------------------------------------------------------------------
# Sizes and durations


def parse_shardpress_size(text: str) -> int:
    """cli/src/size.rs: binary units count in 1024s, decimal ones (k, M, G, T, kB, ...) in 1000s."""
    m = re.fullmatch(r"\s*([0-9_.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number = float(m.group(1).replace("_", ""))
    unit = m.group(2).lower()
    units = {"": 1, "b": 1}
    for i, (binary, short, dec) in enumerate(
        [("kib", "ki", "kb"), ("mib", "mi", "mb"), ("gib", "gi", "gb"), ("tib", "ti", "tb")], 1
    ):
        units[binary] = units[short] = 1024**i
        units[dec] = units[dec[0]] = 1000**i
    if unit not in units:
        raise ValueError(f"unknown unit in {text!r}")
    return int(number * units[unit])


def parse_k8s_quantity(text) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    suffixes = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    return float(m.group(1)) * suffixes[m.group(2)]


def parse_docker_bytes(text) -> int:
    """Docker's RAMInBytes: b, k, m, g (optionally with b) in 1024s."""
    m = re.fullmatch(r"([0-9.]+)\s*([bkmgt]?)b?", str(text).lower())
    if not m:
        raise ValueError(f"not a Docker memory size: {text!r}")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))


def parse_duration(text) -> float:
    total, rest = 0.0, str(text)
    for value, unit in re.findall(r"([0-9.]+)(h|ms|m|s)", rest):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[unit]
    if not re.fullmatch(r"(?:[0-9.]+(?:h|ms|m|s))+", rest):
        raise ValueError(f"not a duration: {text!r}")
    return total


def required_container_memory(memory_limit: int) -> float:
    return (memory_limit + PROCESS_ALLOWANCE) * MEMORY_HEADROOM


# --------------------------------------------------------------------------------------------
# The CLI: subcommands, flags, SHARDPRESS_* variables


class Cli:
    """What the `shardpress` binary accepts: {subcommand: (flags, env names)}."""

    def __init__(self, commands: dict[str, tuple[set, set]], source: str):
        self.commands = commands
        self.source = source

    def flags(self, sub):
        return self.commands[sub][0]

    def envs(self, sub):
        return self.commands[sub][1]


ATTR_FIELD = re.compile(
    r"((?:[ \t]*(?:///[^\n]*|#\[(?:[^\[\]]|\[[^\]]*\])*\])\s*)+)"
    r"[ \t]*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*([^,\n]+),"
)


def parse_structs(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """Top-level structs of a Rust file: name -> [(attributes, field, type)]."""
    structs = {}
    for m in re.finditer(r"^(?:pub(?:\([^)]*\))?\s+)?struct\s+(\w+)\s*\{(.*?)^\}", text, re.S | re.M):
        structs[m.group(1)] = [(f.group(1), f.group(2), f.group(3).strip())
                               for f in ATTR_FIELD.finditer(m.group(2))]
    return structs


def cli_from_source() -> Cli:
    src = REPO / "cli" / "src"
    structs_by_file = {p: parse_structs(p.read_text(encoding="utf-8")) for p in src.rglob("*.rs")}
    by_name: dict[str, list] = {}
    for structs in structs_by_file.values():
        for name, fields in structs.items():
            by_name.setdefault(name, []).append(fields)

    def collect(fields, seen=()) -> tuple[set, set]:
        flags, envs = set(), set()
        for attrs, field, ty in fields:
            if re.search(r"#\[command\(\s*flatten\s*\)\]", attrs):
                inner = re.sub(r"^Option<(.*)>$", r"\1", ty).split("::")[-1]
                candidates = by_name.get(inner, [])
                assert len(candidates) == 1, f"cli/src: flattened struct {inner} found {len(candidates)} times"
                f2, e2 = collect(candidates[0], seen + (inner,))
                flags |= f2
                envs |= e2
                continue
            arg = re.search(r"#\[arg\((.*?)\)\]\s*$", attrs, re.S)
            if not arg:
                continue
            body = arg.group(1)
            named = re.search(r'\blong\s*=\s*"([^"]+)"', body)
            if named:
                flags.add("--" + named.group(1))
            elif re.search(r"\blong\b", body):
                flags.add("--" + field.replace("_", "-"))
            env = re.search(r'\benv\s*=\s*"([^"]+)"', body)
            if env:
                envs.add(env.group(1))
        return flags, envs

    main = (src / "main.rs").read_text(encoding="utf-8")
    enum = re.search(r"enum Command\s*\{(.*?)\n\}", main, re.S)
    assert enum, "cli/src/main.rs: enum Command not found"
    global_flags, global_envs = collect(parse_structs(main)["Cli"])
    global_flags |= {"--help", "--version"}
    commands = {}
    for variant, module, struct in re.findall(r"^\s*(\w+)\(commands::(\w+)::(\w+)\)", enum.group(1), re.M):
        sub = re.sub(r"(?<!^)([A-Z])", r"-\1", variant).lower()
        fields = parse_structs((src / "commands" / f"{module}.rs").read_text(encoding="utf-8"))[struct]
        flags, envs = collect(fields)
        commands[sub] = (flags | global_flags, envs | global_envs)
    assert commands, "cli/src/main.rs: no subcommands parsed"
    return Cli(commands, "cli/src")


def cli_from_binary(binary: str) -> Cli:
    def help_of(*args) -> str:
        out = subprocess.run([binary, *args, "--help"], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith("SHARDPRESS_")})
        if out.returncode != 0:
            raise AssertionError(f"{binary} {' '.join(args)} --help failed: {out.stderr}")
        return out.stdout

    top = help_of()
    section = re.search(r"^Commands:\n(.*?)\n\n", top, re.S | re.M)
    assert section, f"{binary} --help: no Commands section"
    subs = [s for s in re.findall(r"^  (\S+)\s", section.group(1), re.M) if s != "help"]
    commands = {}
    for sub in subs:
        text = help_of(sub)
        flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", text, re.M))
        envs = set(re.findall(r"\[env:\s+(\w+)", text))
        commands[sub] = (flags, envs)
    return Cli(commands, binary)


_CLI = None


def cli() -> Cli:
    global _CLI
    if _CLI is None:
        binary = os.environ.get("SHARDPRESS_BIN")
        _CLI = cli_from_binary(binary) if binary else cli_from_source()
    return _CLI


def check_invocation(test: unittest.TestCase, argv: list[str], where: str):
    """argv without the program name: a subcommand, then arguments."""
    c = cli()
    test.assertTrue(argv, f"{where}: shardpress without a subcommand")
    sub = argv[0]
    test.assertIn(sub, sorted(c.commands), f"{where}: `shardpress {sub}` is not a subcommand "
                                           f"(from {c.source})")
    for arg in argv[1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            test.assertIn(flag, sorted(c.flags(sub)), f"{where}: `shardpress {sub}` has no flag {flag} "
                                                      f"(from {c.source})")


def check_env_names(test: unittest.TestCase, sub: str, names, where: str):
    c = cli()
    for name in names:
        if name.startswith("SHARDPRESS_"):
            test.assertIn(name, sorted(c.envs(sub)), f"{where}: `shardpress {sub}` reads no variable "
                                                     f"{name} (from {c.source})")


# --------------------------------------------------------------------------------------------
# A minimal kustomize


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "images",
                      "replicas", "patches"}
# Strategic merge keys of the lists these manifests patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "name", "envFrom": None, "imagePullSecrets": "name"}


def rid(obj) -> tuple:
    return (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("namespace"),
            obj.get("metadata", {}).get("name"))


def strategic_merge(target: dict, patch: dict, where: str):
    for key, value in patch.items():
        if key.startswith("$"):
            raise AssertionError(f"{where}: patch directive {key} is not supported by this renderer")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value, where)
        elif isinstance(value, list) and isinstance(target.get(key), list) and MERGE_KEYS.get(key):
            merge_key = MERGE_KEYS[key]
            items = target[key]
            for item in value:
                match = [i for i in items if i.get(merge_key) == item.get(merge_key)]
                if match:
                    strategic_merge(match[0], item, where)
                else:
                    items.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def pod_specs(obj):
    spec = obj.get("spec", {})
    if obj.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        yield spec.get("template", {}).get("spec", {})
    elif obj.get("kind") == "CronJob":
        yield spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    elif obj.get("kind") == "Pod":
        yield spec


def containers(obj):
    for ps in pod_specs(obj):
        yield from ps.get("initContainers", []) or []
        yield from ps.get("containers", []) or []


def split_image(image: str):
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    name, tag = image, None
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
    return name, tag, digest


def render(directory: Path, accumulated=None) -> list[dict]:
    """Renders a Kustomization (or, with `accumulated`, applies a Component to it)."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise AssertionError(f"{directory}: no kustomization.yaml")
    k = load_one(kfile)
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise AssertionError(f"{kfile}: fields {sorted(unknown)} are not supported by this renderer")
    is_component = k.get("kind") == "Component"
    if is_component != (accumulated is not None):
        raise AssertionError(f"{kfile}: kind {k.get('kind')} used as "
                             f"{'a component' if accumulated is not None else 'a resource'}")
    objects = accumulated if accumulated is not None else []
    for entry in k.get("resources", []) or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(load_docs(path))
        else:
            raise AssertionError(f"{kfile}: resource {entry} does not exist")
    for entry in k.get("components", []) or []:
        path = (directory / entry).resolve()
        if not path.is_dir():
            raise AssertionError(f"{kfile}: component {entry} does not exist")
        objects = render(path, objects)
    for p in k.get("patches", []) or []:
        if set(p) - {"path", "patch"}:
            raise AssertionError(f"{kfile}: patch fields {sorted(set(p) - {'path', 'patch'})} "
                                 "are not supported by this renderer")
        if "path" in p:
            ppath = directory / p["path"]
            if not ppath.is_file():
                raise AssertionError(f"{kfile}: patch file {p['path']} does not exist")
            patch_docs, where = load_docs(ppath), str(ppath)
        else:
            patch_docs, where = list(yaml.safe_load_all(p["patch"])), f"{kfile} (inline patch)"
        for patch in patch_docs:
            hits = [o for o in objects
                    if o.get("kind") == patch.get("kind")
                    and o.get("apiVersion") == patch.get("apiVersion")
                    and o["metadata"]["name"] == patch["metadata"]["name"]]
            if len(hits) != 1:
                raise AssertionError(f"{where}: patch for {patch.get('kind')}/{patch['metadata']['name']} "
                                     f"matches {len(hits)} resources")
            strategic_merge(hits[0], patch, where)
    if "namespace" in k:
        for o in objects:
            if o.get("kind") not in CLUSTER_SCOPED:
                o.setdefault("metadata", {})["namespace"] = k["namespace"]
    for img in k.get("images", []) or []:
        used = False
        for o in objects:
            for c in containers(o):
                name, tag, digest = split_image(c["image"])
                if name != img["name"]:
                    continue
                used = True
                name = img.get("newName", name)
                if "newTag" in img:
                    tag, digest = img["newTag"], None
                if "digest" in img:
                    tag, digest = None, img["digest"]
                c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        if not used:
            raise AssertionError(f"{kfile}: image {img['name']} is used by no container")
    for rep in k.get("replicas", []) or []:
        hits = [o for o in objects if o["metadata"]["name"] == rep["name"]
                and o.get("kind") in {"Deployment", "StatefulSet", "ReplicaSet"}]
        if len(hits) != 1:
            raise AssertionError(f"{kfile}: replicas for {rep['name']} match {len(hits)} resources")
        hits[0]["spec"]["replicas"] = rep["count"]
    return objects


_RENDERED = {}


def normalized(obj):
    """Sorts merge-keyed lists by name: kustomize puts patched list items first."""
    if isinstance(obj, dict):
        return {k: normalized(v) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [normalized(v) for v in obj]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            items.sort(key=lambda i: str(i["name"]))
        return items
    return obj


def rendered(name: str) -> list[dict]:
    if name not in _RENDERED:
        _RENDERED[name] = render(K8S / name)
    return copy.deepcopy(_RENDERED[name])


def is_core(obj) -> bool:
    return not str(obj.get("apiVersion", "")).startswith("keda.sh/")


def by_kind(objects, kind):
    return [o for o in objects if o.get("kind") == kind]


def component_of(obj):
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def env_map(container) -> dict:
    return {e["name"]: e for e in container.get("env", []) or []}


def env_value(container, name, objects):
    """A container's value for `name`: env, else envFrom ConfigMaps in `objects`."""
    env = env_map(container)
    if name in env:
        return env[name].get("value")
    for src in container.get("envFrom", []) or []:
        ref = src.get("configMapRef")
        if ref:
            for cm in by_kind(objects, "ConfigMap"):
                if cm["metadata"]["name"] == ref["name"] and name in cm.get("data", {}):
                    return cm["data"][name]
    return None


def all_env_names(container, objects) -> set:
    names = set(env_map(container))
    for src in container.get("envFrom", []) or []:
        ref = src.get("configMapRef")
        if ref:
            for cm in by_kind(objects, "ConfigMap"):
                if cm["metadata"]["name"] == ref["name"]:
                    names |= set(cm.get("data", {}))
    return names


def the_deployment(test, objects, component):
    found = [d for d in by_kind(objects, "Deployment") if component_of(d) == component]
    test.assertEqual(len(found), 1, f"expected one {component} Deployment, found {len(found)}")
    return found[0]


def secret_keys() -> dict[str, set]:
    keys = {}
    for s in load_docs(SECRET_EXAMPLE):
        assert s["kind"] == "Secret", f"{SECRET_EXAMPLE}: {s['kind']} is not a Secret"
        keys[s["metadata"]["name"]] = set(s.get("stringData", {})) | set(s.get("data", {}))
    return keys


def dockerfile_uid() -> int:
    stages = dockerfile_stages()
    users = [args for ins, args in stages[-1]["instructions"] if ins == "USER"]
    if not users:
        raise AssertionError(f"{DOCKERFILE}: the final stage sets no USER")
    return int(users[-1].split(":")[0])


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_stages():
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (stripped.startswith("#") or not stripped):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    args, stages = {}, []
    for line in lines:
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif ins == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.I)
            image = re.sub(r"\$\{?(\w+)\}?", lambda v: args.get(v.group(1), v.group(0)), m.group(1))
            stages.append({"image": image, "name": m.group(2), "instructions": []})
        else:
            stages[-1]["instructions"].append((ins, rest.strip()))
    return stages


def dockerignore_patterns():
    patterns = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = os.path.normpath(pat.lstrip("/")).replace(os.sep, "/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                if pat.startswith("/", i):
                    rx = rx[:-2] + "(?:.*/)?"
                    i += 1
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        patterns.append((negate, re.compile(rx + "$")))
    return patterns


def ignored(rel: str, patterns) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# ============================================================================================


class YamlFilesTest(unittest.TestCase):
    def test_every_yaml_file_under_deploy_parses(self):
        need_yaml(self)
        files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})
        names = {p.relative_to(DEPLOY).as_posix() for p in files}
        for expected in ["compose.yaml", "k8s/base/kustomization.yaml",
                         "k8s/overlays/example/kustomization.yaml",
                         "k8s/components/keda/kustomization.yaml"]:
            self.assertIn(expected, names)
        for path in files:
            with self.subTest(path=str(path.relative_to(REPO))):
                docs = load_docs(path)
                self.assertTrue(docs, f"{path}: no YAML document")
                for doc in docs:
                    self.assertIsInstance(doc, dict, f"{path}: a document is not a mapping")


class KustomizeTest(unittest.TestCase):
    def test_render_base_and_overlays(self):
        need_yaml(self)
        base = rendered("base")
        kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base)
        self.assertEqual(kinds, [
            ("ConfigMap", "shardpress-config"),
            ("Deployment", "shardpress-coordinator"),
            ("Deployment", "shardpress-worker"),
            ("PodDisruptionBudget", "shardpress-coordinator"),
            ("Service", "shardpress-coordinator"),
        ])
        for o in base:
            self.assertNotIn("namespace", o["metadata"], f"base is namespace-agnostic: {rid(o)}")
            self.assertTrue(is_core(o), f"base must hold only core kinds: {rid(o)}")
        keda = rendered("overlays/example-keda")
        self.assertEqual(sorted(o["kind"] for o in keda if not is_core(o)),
                         ["ScaledObject", "TriggerAuthentication"])
        self.assertFalse([o for o in rendered("overlays/example") if not is_core(o)],
                         "the example overlay needs no CRDs")

    def test_renders_are_unique_and_in_one_namespace(self):
        need_yaml(self)
        for name in KUSTOMIZATIONS:
            with self.subTest(kustomization=name):
                objects = rendered(name)
                ids = [rid(o) for o in objects]
                self.assertEqual(len(ids), len(set(ids)), f"{name}: duplicate resources")
                namespaces = {o["metadata"].get("namespace") for o in objects
                              if o["kind"] not in CLUSTER_SCOPED}
                self.assertEqual(len(namespaces), 1, f"{name}: resources in namespaces {namespaces}")

    def test_overlay_sets_image_replicas_and_memory(self):
        need_yaml(self)
        k = load_one(K8S / "overlays/example/kustomization.yaml")
        image = k["images"][0]
        want_image = f"{image['newName']}:{image['newTag']}"
        for name in ["overlays/example", "overlays/example-keda"]:
            objects = rendered(name)
            for d in by_kind(objects, "Deployment"):
                for c in containers(d):
                    self.assertEqual(c["image"], want_image, f"{name}: {rid(d)}")
            replicas = {r["name"]: r["count"] for r in k["replicas"]}
            for d in by_kind(objects, "Deployment"):
                self.assertEqual(d["spec"]["replicas"], replicas[d["metadata"]["name"]])
            worker = the_deployment(self, objects, "worker")
            c = worker["spec"]["template"]["spec"]["containers"][0]
            self.assertEqual(env_value(c, "SHARDPRESS_MEMORY_LIMIT", objects), "6GiB")
            self.assertEqual(c["resources"]["limits"]["memory"], "8Gi")
            # The patch merged into the base's env list instead of replacing it.
            self.assertIn("SHARDPRESS_WORKER_TOKEN_FILE", env_map(c))
            self.assertEqual(env_value(c, "SHARDPRESS_S3_PATH_STYLE", objects), "true")
        base_worker = the_deployment(self, rendered("base"), "worker")
        self.assertEqual(env_value(base_worker["spec"]["template"]["spec"]["containers"][0],
                                   "SHARDPRESS_MEMORY_LIMIT", rendered("base")), "3GiB")

    def test_renderer_rejects_what_it_cannot_render(self):
        need_yaml(self)
        base = (K8S / "base").resolve()
        cases = {
            "patch for Deployment/nope matches 0 resources": {
                "resources": [str(base)],
                "patches": [{"patch": "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nope\n"}]},
            "resource missing.yaml does not exist": {"resources": ["missing.yaml"]},
            "not supported by this renderer": {"resources": [str(base)], "commonLabels": {"a": "b"}},
            "image nothing is used by no container": {"resources": [str(base)],
                                                      "images": [{"name": "nothing", "newTag": "1"}]},
        }
        for expected, body in cases.items():
            with self.subTest(expected=expected), tempfile.TemporaryDirectory() as tmp:
                k = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **body}
                (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(k))
                with self.assertRaisesRegex(AssertionError, re.escape(expected)):
                    render(Path(tmp))
        target = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}]}}
        strategic_merge(target, {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}]}}, "t")
        self.assertEqual([e["name"] for e in target["spec"]["containers"][0]["env"]], ["X", "Y"])

    def test_kubectl_kustomize_agrees_when_available(self):
        need_yaml(self)
        kubectl = shutil.which("kubectl")
        if not kubectl:
            self.skipTest("kubectl not on PATH: the Python renderer's output is checked by the "
                          "other tests but not compared with kustomize's")
        for name in KUSTOMIZATIONS:
            with self.subTest(kustomization=name):
                out = subprocess.run([kubectl, "kustomize", str(K8S / name)], capture_output=True,
                                     text=True, timeout=120)
                self.assertEqual(out.returncode, 0, out.stderr)
                theirs = {rid(o): normalized(o) for o in yaml.safe_load_all(out.stdout) if o}
                ours = {rid(o): normalized(o) for o in rendered(name)}
                self.assertEqual(sorted(ours, key=str), sorted(theirs, key=str))
                for key, obj in ours.items():
                    self.assertEqual(obj, theirs[key], f"{name}: {key} differs from kubectl kustomize")


class KubernetesSchemaTest(unittest.TestCase):
    def versions(self):
        latest = kv_utils.latest_version()
        return [latest if v == "latest" else v for v in K8S_VERSIONS]

    def validate(self, obj, where):
        for version in self.versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                self.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']} is invalid for "
                          f"Kubernetes {version} at {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                self.fail(f"{where}: {e.message}")

    def test_validator_works_offline_and_is_strict(self):
        need_yaml(self)
        need_validator(self)
        self.assertIn("1.27.0", kv_utils.all_versions())
        good = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
        kubernetes_validate.validate(good, "1.27.0", strict=True)
        bad = copy.deepcopy(good)
        bad["metadata"]["nmae"] = "typo"
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, "1.27.0", strict=True)

    def test_rendered_manifests_match_the_schemas(self):
        need_yaml(self)
        need_validator(self)
        count = 0
        for name in KUSTOMIZATIONS:
            for obj in rendered(name):
                if is_core(obj):
                    with self.subTest(kustomization=name, obj=rid(obj)):
                        self.validate(obj, name)
                        count += 1
        self.assertGreaterEqual(count, 15)

    def test_each_base_file_and_the_secret_example_match_the_schemas(self):
        need_yaml(self)
        need_validator(self)
        files = [p for p in sorted((K8S / "base").glob("*.yaml")) if p.name != "kustomization.yaml"]
        self.assertIn(SECRET_EXAMPLE, files)
        for path in files:
            for obj in load_docs(path):
                with self.subTest(path=path.name, obj=rid(obj)):
                    self.validate(obj, str(path.relative_to(REPO)))
        listed = load_one(K8S / "base/kustomization.yaml")["resources"]
        self.assertNotIn(SECRET_EXAMPLE.name, listed, "the example Secret must not be applied")


class KubernetesWiringTest(unittest.TestCase):
    def setUp(self):
        need_yaml(self)

    def test_coordinator_service_probes_and_pdb(self):
        proto = (REPO / "proto/proto/shardpress.proto").read_text(encoding="utf-8")
        package = re.search(r"^package\s+([\w.]+);", proto, re.M).group(1)
        services = {f"{package}.{s}" for s in re.findall(r"^service\s+(\w+)", proto, re.M)}
        for name in KUSTOMIZATIONS:
            with self.subTest(kustomization=name):
                objects = rendered(name)
                dep = the_deployment(self, objects, "coordinator")
                self.assertGreaterEqual(dep["spec"]["replicas"], 2)
                pod = dep["spec"]["template"]
                labels = pod["metadata"]["labels"]
                self.assertEqual(dep["spec"]["selector"]["matchLabels"].items() - labels.items(), set())
                (c,) = pod["spec"]["containers"]
                self.assertEqual(c["args"][0], "coordinator")
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                listen = env_value(c, "SHARDPRESS_LISTEN", objects)
                self.assertEqual(listen, f"0.0.0.0:{ports['grpc']}")
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
                    grpc = c[probe]["grpc"]
                    self.assertEqual(grpc["port"], ports["grpc"], probe)
                    if "service" in grpc:
                        self.assertIn(grpc["service"], services | {"grpc.health.v1.Health"}, probe)
                (svc,) = [s for s in by_kind(objects, "Service")
                          if s["metadata"]["name"] == dep["metadata"]["name"]]
                self.assertEqual(svc["spec"]["selector"].items() - labels.items(), set())
                (sport,) = svc["spec"]["ports"]
                self.assertIn(sport["targetPort"], (ports["grpc"], "grpc"))
                (pdb,) = by_kind(objects, "PodDisruptionBudget")
                self.assertEqual(pdb["spec"]["minAvailable"], 1)
                self.assertLess(pdb["spec"]["minAvailable"], dep["spec"]["replicas"])
                self.assertEqual(pdb["spec"]["selector"]["matchLabels"].items() - labels.items(), set())
                # Workers find the coordinators through this Service.
                worker = the_deployment(self, objects, "worker")
                wc = worker["spec"]["template"]["spec"]["containers"][0]
                self.assertEqual(env_value(wc, "SHARDPRESS_COORDINATOR", objects),
                                 f"http://{svc['metadata']['name']}:{sport['port']}")

    def test_worker_memory_grace_and_qos(self):
        for name in KUSTOMIZATIONS:
            with self.subTest(kustomization=name):
                objects = rendered(name)
                worker = the_deployment(self, objects, "worker")
                spec = worker["spec"]["template"]["spec"]
                (c,) = spec["containers"]
                self.assertEqual(c["args"][0], "worker")
                res = c["resources"]
                self.assertEqual(set(res["requests"]), {"cpu", "memory"})
                for key in ["cpu", "memory"]:
                    self.assertEqual(parse_k8s_quantity(res["requests"][key]),
                                     parse_k8s_quantity(res["limits"][key]),
                                     f"requests.{key} must equal limits.{key}")
                budget_text = env_value(c, "SHARDPRESS_MEMORY_LIMIT", objects)
                self.assertIsNotNone(budget_text, "workers must run with SHARDPRESS_MEMORY_LIMIT")
                budget = parse_shardpress_size(budget_text)
                limit = parse_k8s_quantity(res["limits"]["memory"])
                self.assertGreaterEqual(limit, required_container_memory(budget),
                                        f"memory limit {res['limits']['memory']} < (--memory-limit + "
                                        "64 MiB) x 1.25")
                # Not wildly oversized either: the budget should use most of the container.
                self.assertLess(limit, 2 * required_container_memory(budget))
                grace_text = env_value(c, "SHARDPRESS_SHUTDOWN_GRACE", objects)
                self.assertIsNotNone(grace_text, "workers must set SHARDPRESS_SHUTDOWN_GRACE")
                grace = float(grace_text)
                self.assertGreaterEqual(spec["terminationGracePeriodSeconds"], grace + 10,
                                        "Kubernetes must not kill a worker inside its own shutdown grace")
                self.assertGreaterEqual(int(env_value(c, "SHARDPRESS_CONCURRENCY", objects)), 1)

    def test_pods_run_as_the_images_non_root_user(self):
        uid = dockerfile_uid()
        self.assertNotEqual(uid, 0)
        for name in KUSTOMIZATIONS:
            for dep in by_kind(rendered(name), "Deployment"):
                with self.subTest(kustomization=name, deployment=dep["metadata"]["name"]):
                    sc = dep["spec"]["template"]["spec"]["securityContext"]
                    self.assertIs(sc["runAsNonRoot"], True)
                    self.assertEqual(sc["runAsUser"], uid)
                    for c in containers(dep):
                        self.assertIs(c["securityContext"]["allowPrivilegeEscalation"], False)

    def test_secrets_and_config_maps_referenced_exist(self):
        keys = secret_keys()
        for name in KUSTOMIZATIONS:
            objects = rendered(name)
            cms = {o["metadata"]["name"] for o in by_kind(objects, "ConfigMap")}
            refs = []
            for obj in objects:
                for c in containers(obj):
                    for e in c.get("env", []) or []:
                        ref = e.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            refs.append((ref["name"], ref["key"], rid(obj)))
                    for src in c.get("envFrom", []) or []:
                        if "configMapRef" in src:
                            self.assertIn(src["configMapRef"]["name"], cms, rid(obj))
                        if "secretRef" in src:
                            self.assertIn(src["secretRef"]["name"], keys, rid(obj))
                    mounts = {m["name"] for m in c.get("volumeMounts", []) or []}
                    volumes = {v["name"] for ps in pod_specs(obj) for v in ps.get("volumes", []) or []}
                    self.assertEqual(mounts - volumes, set(), f"{rid(obj)}: mounts without volumes")
                for ps in pod_specs(obj):
                    for v in ps.get("volumes", []) or []:
                        if "secret" in v:
                            for item in v["secret"].get("items", []):
                                refs.append((v["secret"]["secretName"], item["key"], rid(obj)))
                if obj["kind"] == "TriggerAuthentication":
                    for t in obj["spec"]["secretTargetRef"]:
                        refs.append((t["name"], t["key"], rid(obj)))
            self.assertGreaterEqual(len(refs), 8)
            for secret, key, who in refs:
                with self.subTest(kustomization=name, ref=(secret, key)):
                    self.assertIn(secret, keys, f"{who}: Secret {secret} is not in secret.example.yaml")
                    self.assertIn(key, keys[secret], f"{who}: Secret {secret} has no key {key}")

    def test_token_files_are_mounted_where_the_env_points(self):
        for name in KUSTOMIZATIONS:
            objects = rendered(name)
            for dep in by_kind(objects, "Deployment"):
                spec = dep["spec"]["template"]["spec"]
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                for c in spec["containers"]:
                    for var, value in ((k, env_value(c, k, objects)) for k in all_env_names(c, objects)):
                        if not var.endswith("_TOKEN_FILE"):
                            continue
                        with self.subTest(kustomization=name, var=var):
                            mount = [m for m in c["volumeMounts"] if value.startswith(m["mountPath"] + "/")]
                            self.assertEqual(len(mount), 1, f"{var}={value} is not under a mount")
                            secret = volumes[mount[0]["name"]]["secret"]
                            rel = value[len(mount[0]["mountPath"]) + 1:]
                            self.assertIn(rel, [i["path"] for i in secret["items"]])
                    if c["args"][0] == "worker":
                        # A worker holds only the worker token.
                        paths = [i["path"] for v in volumes.values() if "secret" in v
                                 for i in v["secret"].get("items", [])]
                        self.assertNotIn("client-token", paths)

    def test_containers_use_real_subcommands_flags_and_variables(self):
        for name in KUSTOMIZATIONS:
            objects = rendered(name)
            for obj in objects:
                for c in containers(obj):
                    where = f"{name}: {rid(obj)} container {c['name']}"
                    argv = list(c.get("command", [])[1:] if c.get("command") else []) + list(c.get("args", []))
                    check_invocation(self, argv, where)
                    check_env_names(self, argv[0], all_env_names(c, objects), where)

    def test_keda_scales_workers_on_the_task_queue(self):
        objects = rendered("overlays/example-keda")
        (so,) = by_kind(objects, "ScaledObject")
        (ta,) = by_kind(objects, "TriggerAuthentication")
        for o in (so, ta):
            self.assertRegex(o["apiVersion"], r"^keda\.sh/v1alpha1$")
        worker = the_deployment(self, objects, "worker")
        self.assertEqual(so["spec"]["scaleTargetRef"]["name"], worker["metadata"]["name"])
        self.assertEqual(so["spec"]["scaleTargetRef"].get("kind", "Deployment"), "Deployment")
        self.assertEqual(so["metadata"].get("namespace"), worker["metadata"].get("namespace"))
        self.assertLessEqual(so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"])
        (trigger,) = so["spec"]["triggers"]
        self.assertEqual(trigger["type"], "postgresql")
        self.assertEqual(trigger["authenticationRef"]["name"], ta["metadata"]["name"])
        wc = worker["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(float(trigger["metadata"]["targetQueryValue"]),
                         float(env_value(wc, "SHARDPRESS_CONCURRENCY", objects)),
                         "one worker per SHARDPRESS_CONCURRENCY tasks")
        # The query against the schema the coordinator migrates to.
        query = trigger["metadata"]["query"]
        m = re.fullmatch(r"SELECT count\(\*\) FROM (\w+) WHERE state IN \(([^)]*)\)", query.strip())
        self.assertTrue(m, f"unexpected query shape: {query}")
        table, states = m.group(1), set(re.findall(r"'(\w+)'", m.group(2)))
        self.assertEqual(states, {"queued", "leased"})
        sql = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "migrations").glob("*.sql")))
        create = re.search(rf"CREATE TABLE {table} \((.*?)\n\);", sql, re.S)
        self.assertTrue(create, f"migrations/ create no table {table}")
        allowed = re.search(r"\bstate\s+text NOT NULL CHECK \(state IN\s*\(([^)]*)\)\)", create.group(1))
        self.assertTrue(allowed, f"table {table} has no state CHECK constraint")
        self.assertLessEqual(states, set(re.findall(r"'(\w+)'", allowed.group(1))))
        # KEDA connects with the same URL as the coordinators.
        (ref,) = ta["spec"]["secretTargetRef"]
        self.assertEqual(ref["parameter"], "connection")
        coord = the_deployment(self, objects, "coordinator")["spec"]["template"]["spec"]["containers"][0]
        db = env_map(coord)["SHARDPRESS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        self.assertEqual((ref["name"], ref["key"]), (db["name"], db["key"]))


# --------------------------------------------------------------------------------------------


PINNED = re.compile(r"^[\w./-]+(?::(?!latest$)[\w.-]*(?:\d+\.\d+|RELEASE\.)[\w.-]*)?(?:@sha256:[0-9a-f]{64})?$")


def is_pinned(image: str) -> bool:
    return bool(PINNED.match(image)) and (":" in image.rsplit("/", 1)[-1] or "@sha256:" in image)


def shell_invocations(script: str) -> list[list[str]]:
    """`shardpress ...` commands in a shell script (one per line, up to an operator)."""
    script = script.replace("$$", "$")
    found = []
    for m in re.finditer(r"(?:^|[\s;&|(])shardpress\s+([^;&|)\n]*)", script):
        found.append(shlex.split(m.group(1)))
    return found


class ComposeTest(unittest.TestCase):
    def setUp(self):
        need_yaml(self)
        self.compose = load_one(COMPOSE)
        self.services = self.compose["services"]

    def shardpress_services(self):
        return {n: s for n, s in self.services.items() if "build" in s}

    def test_services_present(self):
        self.assertLessEqual({"postgres", "minio", "minio-init", "coordinator", "worker", "submitter"},
                             set(self.services))
        self.assertEqual(self.services["worker"]["deploy"]["replicas"], 2)

    def test_images_are_built_from_the_dockerfile_or_pinned(self):
        for name, svc in self.services.items():
            with self.subTest(service=name):
                if "build" in svc:
                    build = svc["build"]
                    context = (COMPOSE.parent / build["context"]).resolve()
                    self.assertEqual(context, REPO)
                    self.assertEqual((context / build["dockerfile"]).resolve(), DOCKERFILE.resolve())
                    self.assertTrue(DOCKERFILE.is_file())
                else:
                    self.assertIn("image", svc, f"{name}: neither build nor image")
                    self.assertTrue(is_pinned(svc["image"]), f"{name}: image {svc['image']} is not pinned "
                                    "(use a versioned tag or a digest, not latest)")
        self.assertFalse(is_pinned("postgres"))
        self.assertFalse(is_pinned("minio/minio:latest"))
        self.assertFalse(is_pinned("postgres:16"))
        self.assertTrue(is_pinned("postgres:16.10-bookworm"))

    def test_depends_on_secrets_and_volumes_are_defined(self):
        top_secrets = set(self.compose.get("secrets", {}))
        top_volumes = set(self.compose.get("volumes", {}))
        for name, svc in self.services.items():
            with self.subTest(service=name):
                deps = svc.get("depends_on", {})
                if isinstance(deps, list):
                    deps = {d: {"condition": "service_started"} for d in deps}
                for dep, spec in deps.items():
                    self.assertIn(dep, sorted(self.services), f"{name} depends on undefined service {dep}")
                    self.assertNotEqual(dep, name)
                    cond = spec.get("condition", "service_started")
                    self.assertIn(cond, {"service_started", "service_healthy",
                                         "service_completed_successfully"})
                    if cond == "service_healthy":
                        self.assertIn("healthcheck", self.services[dep], f"{dep} has no healthcheck")
                    if cond == "service_completed_successfully":
                        self.assertIn(self.services[dep].get("restart", "no"), {"no", "on-failure"})
                for s in svc.get("secrets", []):
                    self.assertIn(s if isinstance(s, str) else s["source"], top_secrets)
                for v in svc.get("volumes", []):
                    source = v.split(":", 1)[0] if isinstance(v, str) else v.get("source")
                    if not re.match(r"^[./~$]", source):
                        self.assertIn(source, top_volumes, f"{name}: volume {source} is not declared")

    def test_shardpress_invocations_are_real(self):
        checked = 0
        for name, svc in self.shardpress_services().items():
            with self.subTest(service=name):
                env = svc.get("environment", {})
                self.assertIsInstance(env, dict)
                entry = svc.get("entrypoint")
                command = svc.get("command")
                invocations = []
                if entry is None:
                    self.assertIsInstance(command, list, f"{name}: command must be a list")
                    invocations.append(command)
                else:
                    self.assertEqual(entry[0], "/bin/sh", f"{name}: unexpected entrypoint {entry}")
                    invocations += shell_invocations("\n".join(command))
                    self.assertTrue(invocations, f"{name}: the script runs no shardpress command")
                hc = svc.get("healthcheck", {}).get("test")
                if hc:
                    self.assertEqual(hc[:2], ["CMD", "shardpress"])
                    invocations.append(hc[2:])
                for argv in invocations:
                    check_invocation(self, argv, f"compose service {name}")
                    checked += 1
                # The environment is shared by the service's command and its healthcheck: each
                # SHARDPRESS_* variable must be read by one of the subcommands it runs.
                read = set().union(*(cli().envs(argv[0]) for argv in invocations))
                for var in env:
                    if var.startswith("SHARDPRESS_"):
                        self.assertIn(var, read, f"compose service {name}: no subcommand it runs "
                                                 f"({sorted({a[0] for a in invocations})}) reads {var} "
                                                 f"(from {cli().source})")
        self.assertGreaterEqual(checked, 5)

    def test_worker_memory_and_grace(self):
        worker = self.services["worker"]
        cmd = worker["command"]
        budget = parse_shardpress_size(cmd[cmd.index("--memory-limit") + 1])
        limit = parse_docker_bytes(worker["deploy"]["resources"]["limits"]["memory"])
        self.assertGreaterEqual(limit, required_container_memory(budget))
        grace = float(cmd[cmd.index("--shutdown-grace") + 1])
        self.assertGreater(parse_duration(worker["stop_grace_period"]), grace)

    def test_tokens_are_secrets_wired_to_the_token_files(self):
        coord = self.services["coordinator"]["environment"]
        self.assertEqual(coord["SHARDPRESS_CLIENT_TOKEN_FILE"], "/run/secrets/client_token")
        self.assertEqual(coord["SHARDPRESS_WORKER_TOKEN_FILE"], "/run/secrets/worker_token")
        self.assertEqual(self.services["worker"]["secrets"], ["worker_token"])
        self.assertEqual(self.services["submitter"]["secrets"], ["client_token"])
        for name, svc in self.shardpress_services().items():
            for var, value in svc.get("environment", {}).items():
                self.assertFalse(var.endswith("_TOKEN"), f"{name}: pass tokens as files, not {var}")
                if var.endswith("_TOKEN_FILE"):
                    secret = value.rsplit("/", 1)[-1]
                    self.assertEqual(value, f"/run/secrets/{secret}")
                    self.assertIn(secret, svc["secrets"], f"{name}: {var} names an unmounted secret")

    def test_shell_parsing_finds_bad_flags(self):
        argv = shell_invocations('job="$$(shardpress submit s3://a/ --recipe w8a16 --bogus x)"')
        self.assertEqual(argv, [["submit", "s3://a/", "--recipe", "w8a16", "--bogus", "x"]])
        with self.assertRaises(AssertionError):
            check_invocation(self, argv[0], "self-test")
        with self.assertRaises(AssertionError):
            check_invocation(self, ["serve"], "self-test")


class DockerfileTest(unittest.TestCase):
    def test_builder_stage(self):
        stages = dockerfile_stages()
        self.assertEqual(len(stages), 2)
        builder = stages[0]
        self.assertEqual(builder["image"], "rust:1.95-slim-bookworm")
        runs = " ".join(a for i, a in builder["instructions"] if i == "RUN")
        self.assertIn("cargo build --release --locked --bin shardpress", runs)

    def test_dependency_layer_lists_every_workspace_member(self):
        members = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))["workspace"]["members"]
        builder = dockerfile_stages()[0]["instructions"]
        copies = [a for i, a in builder if i == "COPY"]
        for member in members:
            self.assertIn(f"{member}/Cargo.toml {member}/", copies, f"member {member} not copied")
        loop = next(a for i, a in builder if i == "RUN" and "cargo fetch" in a)
        listed = re.search(r'members="([\w ]+)"', loop).group(1).split()
        self.assertEqual(sorted(listed), sorted(members))
        self.assertLess(next(n for n, (i, a) in enumerate(builder) if "cargo fetch" in a),
                        next(n for n, (i, a) in enumerate(builder) if i == "COPY" and a == ". ."))

    def test_runtime_stage_is_minimal_non_root_shardpress(self):
        final = dockerfile_stages()[-1]
        self.assertEqual(final["image"], "debian:bookworm-slim")
        ins = final["instructions"]
        installs = [a for i, a in ins if i == "RUN" and "apt-get install" in a]
        self.assertEqual(len(installs), 1)
        words = installs[0].split("apt-get install", 1)[1].split("&&")[0].split()
        self.assertEqual([w for w in words if not w.startswith("-")], ["ca-certificates"])
        users = [a for i, a in ins if i == "USER"]
        self.assertTrue(users, "the final stage sets no USER (it would run as root)")
        user, _, group = users[-1].partition(":")
        self.assertTrue(user.isdigit(), "USER must be numeric for runAsNonRoot")
        self.assertEqual(int(user), 10001)
        self.assertNotEqual(group, "0")
        # Nothing after USER switches back to root.
        last_user = max(n for n, (i, _) in enumerate(ins) if i == "USER")
        self.assertFalse([a for i, a in ins[last_user + 1:] if i == "RUN"])
        entry = [a for i, a in ins if i == "ENTRYPOINT"]
        self.assertTrue(entry, "no ENTRYPOINT")
        argv = json.loads(entry[-1])
        self.assertEqual(len(argv), 1)
        self.assertEqual(os.path.basename(argv[0]), "shardpress")
        copied = [a for i, a in ins if i == "COPY" and a.startswith("--from=builder")]
        self.assertTrue(any(a.endswith(" /usr/local/bin/shardpress") for a in copied))

    def test_dockerignore_keeps_what_the_build_needs(self):
        self.assertTrue(DOCKERIGNORE.is_file(), "deploy/docker/Dockerfile.dockerignore is missing")
        patterns = dockerignore_patterns()
        for junk in ["target", "target/debug/shardpress", ".git/HEAD", "rust-toolchain.toml",
                     "fuzz/target/x", "engine/target/x", "tests/python/test_deploy.py"]:
            self.assertTrue(ignored(junk, patterns), f"{junk} reaches the build context")
        members = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))["workspace"]["members"]
        needed = ["Cargo.toml", "Cargo.lock"]
        needed += [p.relative_to(REPO).as_posix() for p in (REPO / "migrations").glob("*.sql")]
        for member in members:
            for p in (REPO / member).rglob("*"):
                rel = p.relative_to(REPO).as_posix()
                if p.is_file() and "/target/" not in f"/{rel}" and "__pycache__" not in rel:
                    needed.append(rel)
        self.assertGreater(len(needed), 20)
        for rel in needed:
            self.assertFalse(ignored(rel, patterns), f"{rel} is needed by the build but ignored")


class CliSourceTest(unittest.TestCase):
    def test_source_reading_finds_the_service_commands(self):
        c = cli_from_source()
        for sub in ["coordinator", "worker", "submit", "status", "watch", "list", "cancel"]:
            self.assertIn(sub, c.commands)
        self.assertIn("--memory-limit", c.flags("worker"))
        self.assertIn("--s3-path-style", c.flags("worker"))
        self.assertNotIn("--database-url", c.flags("worker"))
        self.assertIn("SHARDPRESS_DATABASE_URL", c.envs("coordinator"))
        self.assertIn("SHARDPRESS_CLIENT_TOKEN_FILE", c.envs("list"))

    def test_source_reading_agrees_with_help(self):
        binary = os.environ.get("SHARDPRESS_BIN")
        if not binary:
            self.skipTest("SHARDPRESS_BIN not set: flags were checked against cli/src only")
        from_help, from_src = cli_from_binary(binary), cli_from_source()
        self.assertEqual(sorted(from_help.commands), sorted(from_src.commands))
        for sub in from_help.commands:
            with self.subTest(sub=sub):
                self.assertEqual(from_help.flags(sub) - {"--help", "--version"},
                                 from_src.flags(sub) - {"--help", "--version"})
                self.assertEqual(from_help.envs(sub), from_src.envs(sub))


if __name__ == "__main__":
    unittest.main()
