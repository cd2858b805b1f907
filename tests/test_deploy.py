"""deploy/: the manifests, the configs, the Dockerfile's contract, the entrypoint and the readiness check.

Nothing here needs Docker or a cluster (this machine has neither). Fast tests parse every YAML under
deploy/, validate the Kubernetes objects against the bundled Kubernetes schemas (kubernetes-validate,
offline), check the InferenceService by hand, and cross-check ports, paths, users and keys between the
manifests, the Dockerfile, the entrypoint and the config.properties files. The entrypoint runs with a
stand-in ``torchserve`` to check what it renders and executes; deploy/ready.py runs against a stand-in
management API. Slow tests run the real thing without Docker: deploy/entrypoint.sh with the image's
command line, environment and directory layout serving a real exported model, and TorchServe started
from the KServe layout with the KServe runtime's arguments.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tools.kserve_store import (
    CONFIG_REL,
    MOUNT,
    STORE_REL,
    ArchiveModel,
    build_layout,
    properties,
    read_archive,
    runtime_args,
    with_snapshot,
    wrapper_view,
)
from tools.server import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
SHIPPED_CONFIG = REPO_ROOT / "config.properties"
KSERVE_CONFIG = DEPLOY / "kserve" / "config.properties"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
READY = DEPLOY / "ready.py"
DOCKERFILE = DEPLOY / "Dockerfile"
KSERVE_DOCKERFILE = DEPLOY / "kserve" / "Dockerfile"
REQUIREMENTS = DEPLOY / "requirements.txt"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------- reading the files


def documents() -> list[tuple[Path, dict]]:
    out = []
    for path in YAML_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def objects(kind: str, under: str = "") -> list[dict]:
    """The ``kind`` objects in the YAML files under ``deploy/UNDER``."""
    found = [doc for path, doc in documents() if doc.get("kind") == kind and path.is_relative_to(DEPLOY / under)]
    assert found, f"no {kind} under deploy/{under}"
    return found


def the(kind: str, under: str = "") -> dict:
    found = objects(kind, under)
    assert len(found) == 1, f"expected one {kind} under deploy/{under}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Dockerfile:
    """The instructions of a Dockerfile: ``(INSTRUCTION, arguments)`` with continuation lines joined."""

    instructions: list[tuple[str, str]]

    @classmethod
    def parse(cls, path: Path) -> "Dockerfile":
        joined, current = [], ""
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#") and not current:
                continue
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            if current.strip():
                joined.append(current.strip())
            current = ""
        return cls([(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined])

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        out = {}
        for args in self.all("ENV"):
            for token in args.split():
                key, _, value = token.partition("=")
                out[key] = value
        return out

    def args(self) -> dict[str, str]:
        return dict(a.split("=", 1) if "=" in a else (a, "") for a in self.all("ARG"))


def container() -> dict:
    (c,) = the("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container()["ports"]}


# ---------------------------------------------------------------- every YAML parses; k8s schemas


def test_every_yaml_under_deploy_parses_into_kubernetes_objects():
    assert {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES} >= {
        "k8s/deployment.yaml", "k8s/service.yaml", "k8s/hpa.yaml", "k8s/networkpolicy.yaml",
        "kserve/inferenceservice.yaml", "kserve/networkpolicy.yaml",
    }
    for path, doc in documents():
        assert isinstance(doc, dict), path
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a Kubernetes object"
        assert doc["metadata"].get("name"), f"{path}: metadata.name"


def test_kubernetes_objects_validate_against_the_bundled_schemas():
    """kubernetes-validate ships the Kubernetes JSON schemas (no network); strict: unknown fields fail."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = 0
    for path, doc in documents():
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            continue  # a CRD: checked by hand below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.relative_to(REPO_ROOT)} ({doc['kind']}): {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 5


def test_the_schema_check_can_fail():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    bad = json.loads(json.dumps(the("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


# ---------------------------------------------------------------- plain Kubernetes: the fields we rely on


def test_deployment_service_hpa_and_networkpolicy_agree():
    dep, svc, hpa = the("Deployment"), the("Service"), the("HorizontalPodAutoscaler")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    ports = container_ports()
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in ports, f"Service targets {port['targetPort']!r}, the container has {sorted(ports)}"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu"
    policy = the("NetworkPolicy", "k8s")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {ports["inference"], ports["metrics"]}, "the management port must not be admitted"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_deployment_matches_the_image():
    image = Dockerfile.parse(DOCKERFILE)
    env = image.env()
    ports = container_ports()
    assert ports["inference"] == int(env["YOLO_INFERENCE_PORT"])
    assert ports["metrics"] == int(env["YOLO_METRICS_PORT"])
    assert "management" not in ports and int(env["YOLO_MANAGEMENT_PORT"]) not in ports.values()
    assert {int(p) for p in image.all("EXPOSE")[0].split()} == set(ports.values())
    pod = the("Deployment")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == image.args()["UID"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert env["YOLO_RUN_DIR"] in mounts, "the run dir (the only one TorchServe writes) must be a volume"


def test_probes_are_the_one_readiness_script_of_the_image():
    image = Dockerfile.parse(DOCKERFILE)
    (healthcheck,) = image.all("HEALTHCHECK")
    probe_cmd = json.loads(healthcheck.split("CMD", 1)[1].strip())
    c = container()
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"] == probe_cmd, f"{probe} must run the HEALTHCHECK's command"
    script = probe_cmd[-1]
    copied = [a for a in image.all("COPY") if "deploy/ready.py" in a]
    assert copied and Path(script).parent.as_posix() + "/" in copied[0], f"{script} is not where the image copies ready.py"
    assert "/ping" not in json.dumps(c["readinessProbe"]), "readiness is the worker status, not /ping"
    # liveness: the same script, frontend only (/ping would need the inference key with token auth on)
    assert c["livenessProbe"]["exec"]["command"] == [*probe_cmd, "--live"]


def test_cpu_requests_and_limits_are_set_and_whole():
    """cpu_budget floors the quota: a fractional limit (1500m) gives 1 thread; say it in whole CPUs."""
    for res in [container()["resources"], the("InferenceService")["spec"]["predictor"]["model"]["resources"]]:
        assert res["requests"]["cpu"] == res["limits"]["cpu"], "requests == limits: Guaranteed QoS"
        assert re.fullmatch(r"[1-9][0-9]*", str(res["limits"]["cpu"])), res["limits"]["cpu"]
        assert res["limits"]["memory"]


def test_manifests_say_how_torch_threads_follow_the_limit():
    for path in (DEPLOY / "k8s" / "deployment.yaml", DEPLOY / "kserve" / "inferenceservice.yaml"):
        text = path.read_text()
        assert "torch_threads" in text and "handler/runtime/cpu_budget.py" in text, path


# ---------------------------------------------------------------- KServe: the CRD by hand, the config


# Fields of KServe v1beta1 (pkg/apis/serving/v1beta1): PredictorSpec's ComponentExtensionSpec + model,
# and ModelSpec = modelFormat, runtime + PredictorExtensionSpec (storageUri, runtimeVersion,
# protocolVersion, storage, the inline corev1.Container).
_PREDICTOR_FIELDS = {
    "model", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy", "serviceAccountName", "nodeSelector", "tolerations", "affinity", "volumes",
}
_MODEL_KSERVE_FIELDS = {"modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage"}


def test_inferenceservice_uses_the_torchserve_runtime_with_v2():
    isvc = the("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= _PREDICTOR_FIELDS, set(predictor) - _PREDICTOR_FIELDS
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "pytorch"}
    assert model["runtime"] == "kserve-torchserve"
    assert model["protocolVersion"] == "v2"
    assert re.match(r"^(s3|gs|pvc|https?|hdfs|webhdfs|oci)://\S+$", model["storageUri"]), model["storageUri"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")
    if predictor["scaleMetric"] == "cpu":
        assert 1 <= predictor["scaleTarget"] <= 100
    mode = isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
    assert mode in (None, "RawDeployment", "Standard", "Serverless", "Knative")


def test_inferenceservice_model_container_is_a_valid_container():
    """What is left of ``model`` after KServe's own fields is an inline corev1.Container: validate it as one."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    model = the("InferenceService")["spec"]["predictor"]["model"]
    inline = {k: v for k, v in model.items() if k not in _MODEL_KSERVE_FIELDS}
    assert "args" not in inline and "command" not in inline, "the runtime's torchserve arguments must stay as they are"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [{"name": "kserve-container", **inline}]}}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_kserve_networkpolicy_selects_the_predictor_and_admits_the_wrapper_only():
    policy = the("NetworkPolicy", "kserve")
    isvc = the("InferenceService")
    assert policy["spec"]["podSelector"]["matchLabels"]["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]
    view = wrapper_view(KSERVE_CONFIG.read_text())
    torchserve_port = int(view.predictor_host.rsplit(":", 1)[1])
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    metrics_port = int(properties(KSERVE_CONFIG.read_text())["metrics_address"].rsplit(":", 1)[1])
    assert allowed == {8080, metrics_port}, "8080 is the KServe wrapper (its ModelServer http_port)"
    assert torchserve_port not in allowed


def test_kserve_config_is_what_the_runtime_and_the_wrapper_expect():
    text = KSERVE_CONFIG.read_text()
    props, view = properties(text), wrapper_view(text)
    assert view.model_names == ["yolo"]
    assert view.predictor_host == "127.0.0.1:8085"  # the wrapper's default port; TorchServe on loopback
    assert view.management_address == "http://127.0.0.1:8085"
    assert view.grpc_inference_address == "127.0.0.1:" + props["grpc_inference_port"]
    # the runtime passes --model-store=/mnt/models/model-store; the wrapper checks that directory for a .mar
    assert view.model_store == str(MOUNT / STORE_REL)
    assert f"--model-store={view.model_store}" in runtime_args()
    assert f"--ts-config={MOUNT / CONFIG_REL}" in runtime_args()
    snapshot = json.loads(props["model_snapshot"])
    (versions,) = snapshot["models"].values()
    (entry,) = versions.values()
    assert entry["marName"] == "yolo.mar" and entry["defaultVersion"] is True and snapshot["modelCount"] == 1


def test_kserve_config_auth_and_envelope_choices():
    props = properties(KSERVE_CONFIG.read_text())
    assert props["disable_token_authorization"] == "true", "the KServe wrapper sends no token (pytorch/serve#3301)"
    for key in ("inference_address", "management_address"):
        assert "://127.0.0.1:" in props[key], f"{key}: tokenless TorchServe must stay on the pod's loopback"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props.get("enable_model_api", "false") == "false"
    # KServe sets TS_SERVICE_ENVELOPE=kservev2; only enable_envvars_config=true would let it in
    assert props["enable_envvars_config"] == "false" and "service_envelope" not in props


def test_the_shipped_config_keeps_token_auth_on():
    props = properties(SHIPPED_CONFIG.read_text())
    assert props.get("disable_token_authorization", "false") == "false"
    assert props.get("enable_model_api", "false") == "false"


def _torchserve_config_keys() -> bytes:
    """TorchServe's ConfigManager class file (its constant pool holds every config key), from the frontend jar."""
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as z:
        return z.read("org/pytorch/serve/util/ConfigManager.class")


@pytest.mark.parametrize("config", [SHIPPED_CONFIG, KSERVE_CONFIG], ids=["shipped", "kserve"])
def test_every_config_key_is_a_torchserve_key(config):
    """TorchServe ignores an unknown key silently: a typo would turn a setting off without a word."""
    constants = _torchserve_config_keys()
    for key in properties(config.read_text()):
        utf8 = b"\x01" + struct.pack(">H", len(key.encode())) + key.encode()  # a CONSTANT_Utf8 entry
        assert utf8 in constants, f"{config.name}: {key!r} is not a TorchServe 0.12 config key"


def test_kserve_config_shares_the_shipped_limits():
    shipped, kserve = properties(SHIPPED_CONFIG.read_text()), properties(KSERVE_CONFIG.read_text())
    for key in ("max_request_size", "max_response_size", "metrics_mode", "model_metrics_auto_detect", "allowed_urls"):
        assert kserve[key] == shipped[key], key


# ---------------------------------------------------------------- tools/kserve_store.py


def fake_mar(path: Path, name: str = "yolo", config_yaml: str | None = None, version: str = "1.0") -> Path:
    """A zip with what read_archive reads: MAR-INF/MANIFEST.json and the archive's model-config.yaml."""
    from export.archive import model_config_yaml

    manifest = {"runtime": "python", "model": {"modelName": name, "modelVersion": version, "handler": "yolo_handler.py",
                                                "serializedFile": "backbone.pt", "configFile": "model-config.yaml"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        z.writestr("model-config.yaml", model_config_yaml() if config_yaml is None else config_yaml)
    return path


def test_shipped_kserve_snapshot_is_what_the_tool_writes_for_a_default_archive(tmp_path):
    model = read_archive(fake_mar(tmp_path / "yolo.mar"))
    assert with_snapshot(KSERVE_CONFIG.read_text(), model) == KSERVE_CONFIG.read_text()


def test_kserve_store_cli_builds_the_layout(tmp_path):
    mar = fake_mar(tmp_path / "in" / "yolo.mar", config_yaml="minWorkers: 2\nmaxWorkers: 3\nbatchSize: 8\nmaxBatchDelay: 5\nresponseTimeout: 30\n")
    out = tmp_path / "layout"
    proc = subprocess.run([sys.executable, "-m", "tools.kserve_store", "--mar", str(mar), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model-store" / "yolo.mar").read_bytes() == mar.read_bytes()
    written = (out / "config" / "config.properties").read_text()
    template = KSERVE_CONFIG.read_text()
    changed = [(a, b) for a, b in zip(template.splitlines(), written.splitlines()) if a != b]
    assert len(template.splitlines()) == len(written.splitlines()) and len(changed) == 1
    assert changed[0][1].startswith("model_snapshot=")
    entry = json.loads(properties(written)["model_snapshot"])["models"]["yolo"]["1.0"]
    assert entry == {"defaultVersion": True, "marName": "yolo.mar", "minWorkers": 2, "maxWorkers": 3,
                     "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 30}
    assert "/v2/models/yolo/infer" in proc.stdout


def test_kserve_store_names_the_model_from_the_archive(tmp_path):
    mar = fake_mar(tmp_path / "det.mar", name="detector", version="2.1")
    build_layout(mar, tmp_path / "out")
    view = wrapper_view((tmp_path / "out" / CONFIG_REL).read_text())
    assert view.model_names == ["detector"]
    assert json.loads(properties((tmp_path / "out" / CONFIG_REL).read_text())["model_snapshot"])["models"]["detector"]["2.1"]["marName"] == "det.mar"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p, "not found"),
        (lambda p: (p.write_bytes(b"not a zip"), p)[1], "not a torch-model-archiver .mar"),
        (lambda p: fake_mar(p, config_yaml="batchSize: four\n"), "batchSize"),
        (lambda p: fake_mar(p, config_yaml="maxWorkers: true\n"), "maxWorkers"),
    ],
)
def test_kserve_store_refuses_bad_archives_with_exit_2(tmp_path, make, message):
    mar = make(tmp_path / "yolo.mar")
    proc = subprocess.run([sys.executable, "-m", "tools.kserve_store", "--mar", str(mar), "--out", str(tmp_path / "o")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_kserve_store_refuses_a_store_with_another_archive(tmp_path):
    out = tmp_path / "o"
    (out / "model-store").mkdir(parents=True)
    (out / "model-store" / "old.mar").write_bytes(b"x")
    with pytest.raises(ValueError, match="old.mar"):
        build_layout(fake_mar(tmp_path / "yolo.mar"), out)


def test_archive_model_defaults_when_the_yaml_omits_keys(tmp_path):
    model = read_archive(fake_mar(tmp_path / "yolo.mar", config_yaml="batchSize: 2\n"))
    assert model == ArchiveModel("yolo", "1.0", "yolo.mar", 1, 1, 2, 100, 120)


# ---------------------------------------------------------------- the image's Python packages


_IMPORT_TO_REQUIREMENT = {"cv2": "opencv-python-headless", "PIL": "pillow", "numpy": "numpy", "lap": "lap",
                          "ts": "torchserve", "yaml": "pyyaml", "openvino": "openvino"}


def _third_party_imports(root: Path) -> set[str]:
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("handler", "__future__")}


def test_requirements_cover_everything_the_worker_imports():
    """The image installs torch + deploy/requirements.txt; a new import in handler/ must land there too."""
    required = {re.split(r"[=<>~! \[]", line.strip(), maxsplit=1)[0].lower()
                for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")}
    imports = _third_party_imports(REPO_ROOT / "handler")
    assert "torch" in imports and "ts" in imports and "openvino" in imports  # every backbone runtime is in the image
    for name in sorted(imports - {"torch"}):
        assert name in _IMPORT_TO_REQUIREMENT, f"handler/ imports {name!r}: add it to deploy/requirements.txt and this map"
        assert _IMPORT_TO_REQUIREMENT[name] in required, f"handler/ imports {name!r} but deploy/requirements.txt lacks it"
    assert "ultralytics" not in required


# ---------------------------------------------------------------- the Dockerfiles


def test_dockerfile_recipe():
    image = Dockerfile.parse(DOCKERFILE)
    args = image.args()
    assert "BASE_IMAGE" in args and image.all("FROM") == ["${BASE_IMAGE}"], "the base image is a build argument"
    assert "TORCH_INDEX_URL" in args, "CPU or CUDA wheels follow the base image"
    run = " ".join(image.all("RUN"))
    assert "openjdk-17" in run, "TorchServe 0.12 needs Java 17"
    assert "-r /opt/yolo/deploy/requirements.txt" in run
    (user,) = image.all("USER")
    assert user not in ("root", "0") and f"--uid \"${{UID}}\" --user-group --home-dir {image.env()['YOLO_RUN_DIR']}" in run
    (entrypoint,) = image.all("ENTRYPOINT")
    assert json.loads(entrypoint)[-1] == "/opt/yolo/deploy/entrypoint.sh"
    assert "tini" in json.loads(entrypoint)[0], "PID 1 must forward SIGTERM"
    assert "--foreground" in ENTRYPOINT.read_text()


def test_both_images_install_and_import_every_backbone_runtime():
    """The openvino runtime comes from deploy/requirements.txt in the serving image and in the KServe image; each build
    imports it, so an image without it fails to build instead of serving the slower runtime."""
    for dockerfile in (DOCKERFILE, KSERVE_DOCKERFILE):
        run = " ".join(Dockerfile.parse(dockerfile).all("RUN"))
        assert "requirements.txt" in run and re.search(r"import [^\"]*\bopenvino\b", run), dockerfile.name


def test_dockerfile_copies_files_that_exist_and_are_in_the_build_context():
    for dockerfile in (DOCKERFILE, KSERVE_DOCKERFILE):
        ignore = Path(str(dockerfile) + ".dockerignore").read_text().splitlines()
        included = {line[1:] for line in ignore if line.startswith("!")}
        for copy in Dockerfile.parse(dockerfile).all("COPY"):
            *sources, _dest = [t for t in copy.split() if not t.startswith("--")]
            for src in sources:
                if src.rstrip("/") == "model_store":
                    assert "model_store/*.mar" in included  # the user's archive, not in git
                    continue
                assert (REPO_ROOT / src).is_file(), f"{dockerfile.name} copies {src}, which does not exist"
                assert src in included, f"{src} is not in {dockerfile.name}.dockerignore's context"


def test_dockerfile_env_is_what_the_entrypoint_reads():
    env = Dockerfile.parse(DOCKERFILE).env()
    script = ENTRYPOINT.read_text()
    defaults = dict(re.findall(r'^: "\$\{(YOLO_[A-Z_]+):=([^}]*)\}"', script, re.M))
    for key, value in env.items():
        if key.startswith("YOLO_") and key != "YOLO_MODEL":
            assert key in defaults, f"the image sets {key}, which entrypoint.sh does not read"
            assert defaults[key].replace("$YOLO_HOME", env["YOLO_HOME"]) == value, key
    assert env["YOLO_CONFIG"] == "/opt/yolo/config.properties"


def test_kserve_dockerfile_extends_the_runtime_image():
    image = Dockerfile.parse(KSERVE_DOCKERFILE)
    assert image.args()["BASE_IMAGE"].startswith("pytorch/torchserve-kfs:0.12")
    assert "ENTRYPOINT" not in {n for n, _ in image.instructions}, "the runtime's entrypoint starts the wrapper"
    assert image.all("USER")[-1] == "model-server"
    assert Dockerfile.parse(DOCKERFILE).args()["TORCH_VERSION"] == image.args()["TORCH_VERSION"]


# ---------------------------------------------------------------- entrypoint.sh with a stand-in torchserve


_FAKE_TORCHSERVE = """#!/bin/sh
# stand-in: record the command line, the environment and the working directory, then exit
python3 - "$@" <<'EOF'
import json, os, sys
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}, open(os.environ["FAKE_OUT"], "w"))
EOF
"""


def image_tree(root: Path, mar: Path | None = None, config: Path = SHIPPED_CONFIG) -> dict[str, str]:
    """The image's layout under ``root`` (``/opt/yolo`` -> ``root/opt/yolo``...) and its ENV, rebased."""
    home = root / "opt" / "yolo"
    (home / "deploy").mkdir(parents=True)
    shutil.copy2(config, home / "config.properties")
    shutil.copy2(ENTRYPOINT, home / "deploy" / "entrypoint.sh")
    shutil.copy2(READY, home / "deploy" / "ready.py")
    (home / "model-store").mkdir()
    if mar is None:
        (home / "model-store" / "yolo.mar").write_bytes(b"placeholder")
    else:
        shutil.copy2(mar, home / "model-store" / "yolo.mar")
    (root / "srv" / "yolo").mkdir(parents=True)
    env = {}
    for key, value in Dockerfile.parse(DOCKERFILE).env().items():
        if key in ("PATH", "VIRTUAL_ENV"):
            continue
        env[key] = str(root) + value if value.startswith(("/opt/", "/srv/")) else value
    env["HOME"] = env["YOLO_RUN_DIR"]
    return env


def run_entrypoint_with_fake_torchserve(tmp_path: Path, env_overrides: dict[str, str] | None = None, config: Path = SHIPPED_CONFIG):
    env = image_tree(tmp_path / "image", config=config)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "torchserve").write_text(_FAKE_TORCHSERVE)
    (fake_bin / "torchserve").chmod(0o755)
    out = tmp_path / "fake.json"
    run_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "FAKE_OUT": str(out), "TS_CONFIG_FILE": "/nowhere", **env, **(env_overrides or {})}
    proc = subprocess.run([str(tmp_path / "image" / "opt" / "yolo" / "deploy" / "entrypoint.sh"), "--extra"],
                          env=run_env, capture_output=True, text=True, timeout=60)
    return proc, (json.loads(out.read_text()) if out.exists() else None), env


def test_entrypoint_renders_the_shipped_config_and_execs_torchserve(tmp_path):
    proc, seen, env = run_entrypoint_with_fake_torchserve(tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(env["YOLO_RUN_DIR"])
    running = run_dir / "config.properties"
    assert seen["argv"] == ["--foreground", "--ncs", "--ts-config", str(running), "--model-store", env["YOLO_MODEL_STORE"], "--extra"]
    assert Path(seen["cwd"]) == run_dir, "key_file.json lands in TorchServe's cwd, where ready.py reads it"
    assert seen["env"]["TMPDIR"] == seen["env"]["TEMP"] == str(run_dir / "tmp")
    assert seen["env"]["LOG_LOCATION"] == str(run_dir / "logs")
    assert "TS_CONFIG_FILE" not in seen["env"]
    shipped, rendered = properties(SHIPPED_CONFIG.read_text()), properties(running.read_text())
    assert rendered["inference_address"] == "http://0.0.0.0:8080"
    assert rendered["metrics_address"] == "http://0.0.0.0:8082"
    assert rendered["management_address"] == "http://127.0.0.1:8081"
    assert rendered["grpc_inference_address"] == rendered["grpc_management_address"] == "127.0.0.1"
    assert (rendered["grpc_inference_port"], rendered["grpc_management_port"]) == ("7070", "7071")
    assert rendered["disable_token_authorization"] == "false"
    moved = {"inference_address", "management_address", "metrics_address", "grpc_inference_address",
             "grpc_management_address", "grpc_inference_port", "grpc_management_port", "disable_token_authorization"}
    assert {k: v for k, v in rendered.items() if k not in moved} == {k: v for k, v in shipped.items() if k not in moved}
    assert running.read_text().count("disable_token_authorization=") == 1


def test_entrypoint_ports_and_token_switch(tmp_path):
    proc, seen, env = run_entrypoint_with_fake_torchserve(
        tmp_path, {"YOLO_INFERENCE_PORT": "9000", "YOLO_BIND_ADDRESS": "127.0.0.1", "YOLO_DISABLE_TOKEN_AUTH": "true"})
    assert proc.returncode == 0, proc.stderr
    rendered = properties((Path(env["YOLO_RUN_DIR"]) / "config.properties").read_text())
    assert rendered["inference_address"] == "http://127.0.0.1:9000"
    assert rendered["disable_token_authorization"] == "true"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"YOLO_DISABLE_TOKEN_AUTH": "yes"}, "must be true or false"),
        ({"YOLO_CONFIG": "/no/such/file"}, "no config"),
        ({"YOLO_MODEL_STORE": "/no/such/dir"}, "no model store"),
    ],
)
def test_entrypoint_refuses_bad_settings(tmp_path, overrides, message):
    proc, seen, _ = run_entrypoint_with_fake_torchserve(tmp_path, overrides)
    assert proc.returncode == 64 and message in proc.stderr and seen is None


def test_entrypoint_refuses_a_config_without_an_address_key(tmp_path):
    broken = tmp_path / "broken.properties"
    broken.write_text("\n".join(l for l in SHIPPED_CONFIG.read_text().splitlines() if not l.startswith("metrics_address=")))
    proc, seen, _ = run_entrypoint_with_fake_torchserve(tmp_path, config=broken)
    assert proc.returncode == 64 and "metrics_address" in proc.stderr and seen is None


# ---------------------------------------------------------------- ready.py against a stand-in management API


class _FakeManagement(http.server.BaseHTTPRequestHandler):
    """GET /models/yolo -> a description with ``state.statuses``; with ``?customized=true`` it also carries
    ``state.custom`` (answered with ``state.custom_status`` after ``state.custom_delay`` seconds); /token renews
    the key file."""

    state: dict = {}

    def do_GET(self):  # noqa: N802
        st = self.state
        st["seen"].append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/token"):
            if self.headers.get("Authorization") != f"Bearer {st['api_key']}":
                return self._send(400, {"code": 400, "message": "Token Authorization failed"})
            keys = json.loads(st["key_file"].read_text())
            st["management_key"] = keys["management"]["key"] = "renewed"
            keys["management"]["expiration time"] = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
            st["key_file"].write_text(json.dumps(keys))
            return self._send(200, {})
        if st["token"] and self.headers.get("Authorization") != f"Bearer {st['management_key']}":
            return self._send(400, {"code": 400, "message": "Token Authorization failed"})
        if self.path not in ("/models/yolo", "/models/yolo?customized=true"):
            return self._send(404, {"code": 404, "message": "Model not found"})
        workers = [{"id": str(i), "status": s} for i, s in enumerate(st["statuses"])]
        description = {"modelName": "yolo", "modelVersion": "1.0", "workers": workers}
        if self.path.endswith("customized=true"):
            time.sleep(st["custom_delay"])  # the describe request waits in the model's queue
            return self._send(st["custom_status"], [{**description, "customizedMetadata": st["custom"]}])
        self._send(200, [description])

    def _send(self, code, body):
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the probe gave up waiting (a describe request that queues)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_management(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeManagement)
    key_file = tmp_path / "key_file.json"
    state = {"seen": [], "statuses": ["READY"], "token": True, "management_key": "mkey", "api_key": "apikey", "key_file": key_file,
             "custom": {"model": "yolo", "task": "pose"}, "custom_status": 200, "custom_delay": 0.0}
    _FakeManagement.state = state
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    key_file.write_text(json.dumps({"management": {"key": "mkey", "expiration time": later},
                                    "inference": {"key": "ikey", "expiration time": later}, "API": {"key": "apikey"}}))
    config = tmp_path / "config.properties"
    config.write_text(f"management_address=http://0.0.0.0:{server.server_address[1]}\n")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state, config, key_file
    server.shutdown()
    server.server_close()


def run_ready(config: Path, key_file: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(READY), "--config", str(config), "--key-file", str(key_file), *extra],
                          capture_output=True, text=True, timeout=30)


def test_ready_when_a_worker_is_ready(fake_management):
    state, config, key_file = fake_management
    state["statuses"] = ["UNLOADING", "READY"]
    proc = run_ready(config, key_file)
    assert proc.returncode == 0 and "yolo: 1 of 2 workers READY" in proc.stdout, proc.stderr
    assert state["seen"] == [("/models/yolo", "Bearer mkey"), ("/models/yolo?customized=true", "Bearer mkey")]


def test_not_ready_when_the_model_failed_to_load(fake_management):
    """A READY worker whose model failed to load answers every request with 503: the pod must leave the Service."""
    from handler.errors import ModelLoadFailed

    state, config, key_file = fake_management
    state["custom"] = {"model": "yolo", "model_version": "1.0", **ModelLoadFailed("yolo 1.0 could not load: ValueError: bad").body()}
    state["custom_status"] = 503
    proc = run_ready(config, key_file)
    assert proc.returncode == 1, proc.stdout
    assert "1 of 1 workers READY, but its model failed to load" in proc.stderr and "ValueError: bad" in proc.stderr, proc.stderr
    assert run_ready(config, key_file, "--live").returncode == 0  # alive: a restart would not fix the archive


def test_ready_when_the_describe_request_waits_behind_requests(fake_management):
    """A worker whose model failed to load answers at once; one that makes the describe request wait is serving."""
    state, config, key_file = fake_management
    state["custom_delay"] = 2.0
    proc = run_ready(config, key_file, "--timeout", "0.5")
    assert proc.returncode == 0 and "1 of 1 workers READY" in proc.stdout, proc.stderr


@pytest.mark.parametrize("statuses", [[], ["LOADING"], ["UNLOADING", "STOPPED"]])
def test_not_ready_without_a_ready_worker(fake_management, statuses):
    state, config, key_file = fake_management
    state["statuses"] = statuses
    proc = run_ready(config, key_file)
    assert proc.returncode == 1 and "0 of" in proc.stderr


def test_live_while_the_worker_loads(fake_management, tmp_path):
    state, config, key_file = fake_management
    state["statuses"] = ["LOADING"]
    assert run_ready(config, key_file).returncode == 1
    live = run_ready(config, key_file, "--live")
    assert live.returncode == 0 and "0 of 1 workers READY" in live.stdout
    closed = tmp_path / "closed.properties"
    closed.write_text("management_address=http://127.0.0.1:9\n")
    assert run_ready(closed, key_file, "--live").returncode == 1


def test_not_ready_for_a_wrong_key_an_unknown_model_or_no_server(fake_management, tmp_path):
    state, config, key_file = fake_management
    state["management_key"] = "other"
    assert "HTTP 400" in run_ready(config, key_file).stderr
    state["management_key"] = "mkey"
    proc = run_ready(config, key_file, "--model", "nope")
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr
    missing = run_ready(config, tmp_path / "no_key_file.json")
    assert missing.returncode == 1 and "no_key_file.json" in missing.stderr
    closed = tmp_path / "closed.properties"
    closed.write_text("management_address=http://127.0.0.1:9\n")
    assert run_ready(closed, key_file).returncode == 1
    assert "entrypoint.sh writes it" in run_ready(tmp_path / "absent.properties", key_file).stderr


def test_ready_renews_an_expired_management_key_with_the_api_key(fake_management):
    state, config, key_file = fake_management
    keys = json.loads(key_file.read_text())
    keys["management"]["expiration time"] = (datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    key_file.write_text(json.dumps(keys))
    proc = run_ready(config, key_file)
    assert proc.returncode == 0, proc.stderr
    assert state["seen"][:2] == [("/token?type=management", "Bearer apikey"), ("/models/yolo", "Bearer renewed")]


def test_ready_sends_no_token_when_token_auth_is_off(fake_management):
    state, config, key_file = fake_management
    state["token"] = False
    config.write_text(config.read_text() + "disable_token_authorization=true\n")
    key_file.unlink()
    assert run_ready(config, key_file).returncode == 0
    assert {auth for _, auth in state["seen"]} == {None} and state["seen"][0][0] == "/models/yolo"


# ---------------------------------------------------------------- slow: the real thing, without Docker


@pytest.fixture(scope="module")
def deploy_store(pose_export, tmp_path_factory) -> Path:
    """yolo.mar of the real yolo11n-pose export with the shipped defaults (torch_threads auto)."""
    from serving_support import build_test_store

    return build_test_store(pose_export.out_dir, tmp_path_factory, "deploy_store", {"warmup": 0}) / "yolo.mar"


def _bus_jpg() -> bytes:
    from export.exporter import sample_images

    (bus,) = [p for p in sample_images() if p.name == "bus.jpg"]
    return bus.read_bytes()


def _group_pids(pgid: int) -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                pids.add(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


# Run a command with the whole filesystem read-only except one directory, in a private mount namespace:
# what a pod with readOnlyRootFilesystem: true and an emptyDir at YOLO_RUN_DIR gives the container.
_READ_ONLY_ROOT = (
    'run="$1"; shift; mount --bind / / && mount -o remount,bind,ro / '
    '&& mount --bind "$run" "$run" && mount -o remount,bind,rw "$run" && exec "$@"'
)


def read_only_root(run_dir: Path) -> list[str]:
    """The prefix that runs a command with only ``run_dir`` writable; [] where mount namespaces are not allowed."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", _READ_ONLY_ROOT, "sh", str(run_dir), "true"],
                           capture_output=True, timeout=30) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        return []
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", _READ_ONLY_ROOT, "sh", str(run_dir)]


def _ready(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The HEALTHCHECK's command with the image's environment."""
    return subprocess.run([sys.executable, env["YOLO_HOME"] + "/deploy/ready.py"], env=env, capture_output=True, text=True, timeout=30)


def _ready_live(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, env["YOLO_HOME"] + "/deploy/ready.py", "--live"], env=env, capture_output=True, text=True, timeout=30)


def _wait_ready(env: dict[str, str], proc: subprocess.Popen, timeout: float = 240) -> str:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"entrypoint exited with {proc.returncode}; see {env['YOLO_RUN_DIR']}/logs"
        ready = _ready(env)
        if ready.returncode == 0:
            return ready.stdout
        last = ready.stderr
        time.sleep(1)
    raise AssertionError(f"not READY after {timeout} s: {last}")


def _start_image(root: Path, mar: Path, config: Path = SHIPPED_CONFIG, cpus: set[int] | None = None):
    """deploy/entrypoint.sh as the image runs it: its ENV and directory layout under ``root``, free loopback
    ports, everything read-only but the run dir (readOnlyRootFilesystem + the emptyDir), its own process
    group (tini -g signals the group), pinned to ``cpus`` if given (a cpuset, like a container's).
    Returns (process, env, ports, log, read_only)."""
    from tools.server import free_ports

    env = image_tree(root, mar=mar, config=config)
    ports = free_ports(5)
    env.update(YOLO_BIND_ADDRESS="127.0.0.1", YOLO_INFERENCE_PORT=str(ports[0]), YOLO_MANAGEMENT_PORT=str(ports[1]),
               YOLO_METRICS_PORT=str(ports[2]), YOLO_GRPC_INFERENCE_PORT=str(ports[3]), YOLO_GRPC_MANAGEMENT_PORT=str(ports[4]))
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    prefix = read_only_root(Path(env["YOLO_RUN_DIR"]))
    if cpus:
        prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *prefix]
    log = open(root / "entrypoint.log", "wb")
    proc = subprocess.Popen([*prefix, env["YOLO_HOME"] + "/deploy/entrypoint.sh"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    return proc, env, ports, log, bool(prefix)


def _stop_group(proc: subprocess.Popen, log, timeout: float = 90) -> set[int]:
    """SIGTERM to the entrypoint's process group (what tini -g does on docker stop); the PIDs left after."""
    pids = _group_pids(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    left = {p.pid for p in alive}
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)
    log.close()
    return left


@pytest.mark.slow
def test_image_entrypoint_serves_a_request(tmp_path, deploy_store):
    """Pinned to one CPU like a container with a one-CPU cpuset: the worker's auto threads must be 1."""
    one_cpu = {min(os.sched_getaffinity(0))}
    proc, env, ports, log, read_only = _start_image(tmp_path, deploy_store, cpus=one_cpu)
    print(f"read-only root filesystem except {env['YOLO_RUN_DIR']}: {read_only}")
    try:
        summary = _wait_ready(env, proc)
        assert "yolo: 1 of 1 workers READY" in summary
        run_dir = Path(env["YOLO_RUN_DIR"])
        key = json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
        url = f"http://127.0.0.1:{ports[0]}/predictions/yolo"
        denied = requests.post(url, data=_bus_jpg(), headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert denied.status_code in (400, 401), "the image keeps token authorization on"
        r = requests.post(url, data=_bus_jpg(), headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "pose" and (body["image"]["width"], body["image"]["height"]) == (810, 1080)
        assert any(d["class_name"] == "person" for d in body["detections"])
        # /ping is no probe with token auth on: it wants the inference key too
        assert requests.get(f"http://127.0.0.1:{ports[0]}/ping", timeout=30).status_code == 400
        assert _ready_live(env).returncode == 0
        metrics = requests.get(f"http://127.0.0.1:{ports[2]}/metrics", timeout=30)
        assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text
        # everything TorchServe wrote is under the run dir (with read_only, nothing else could be written)
        assert (run_dir / "tmp" / ".model_server.pid").exists() and (run_dir / "logs" / "model_log.log").exists()
        worker_log = (run_dir / "logs" / "model_log.log").read_text(errors="replace")
        assert "loaded yolo" in worker_log
        # torch_threads 0 (auto) from handler/runtime/cpu_budget.py: the affinity of 1 CPU, not os.cpu_count()
        assert re.search(r"loaded yolo .* threads=1 ", worker_log), re.findall(r"loaded yolo .*", worker_log)
        pids = _group_pids(proc.pid)
        assert len(pids) >= 3, "the launcher, the Java frontend and a worker, all in the entrypoint's group"
    finally:
        left = _stop_group(proc, log)
    assert not left, f"processes still alive 90 s after SIGTERM: {left}"
    assert proc.returncode is not None


@pytest.mark.slow
def test_image_readiness_survives_management_key_expiry(tmp_path, deploy_store):
    """Keys expire (60 min by default): with a 3 s expiry, ready.py renews the management key and stays green."""
    config = tmp_path / "short_keys.properties"
    config.write_text(SHIPPED_CONFIG.read_text() + "\ntoken_expiration_min=0.05\n")
    proc, env, ports, log, _ = _start_image(tmp_path, deploy_store, config=config)
    try:
        _wait_ready(env, proc)
        key_file = Path(env["YOLO_RUN_DIR"]) / "key_file.json"
        first = json.loads(key_file.read_text())["management"]["key"]
        time.sleep(4)
        ready = _ready(env)
        assert ready.returncode == 0, ready.stderr
        assert json.loads(key_file.read_text())["management"]["key"] != first
    finally:
        left = _stop_group(proc, log)
    assert not left


@pytest.mark.slow
def test_kserve_layout_serves_without_token_and_without_the_envelope(tmp_path, deploy_store):
    """TorchServe from the tool's layout with the KServe runtime's arguments and KServe's v2 env
    (TS_SERVICE_ENVELOPE=kservev2): tokenless, batching from the snapshot, our handler's own answers."""
    from tools.kserve_runtime import running_layout_server

    layout = tmp_path / "layout"
    proc = subprocess.run([sys.executable, "-m", "tools.kserve_store", "--mar", str(deploy_store), "--out", str(layout)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with running_layout_server(layout, tmp_path / "server") as server:
        (model,) = requests.get(f"{server.management_url}/models/yolo", timeout=30).json()
        from export.archive import BATCH_DELAY_MS

        assert (model["batchSize"], model["maxBatchDelay"]) == (4, BATCH_DELAY_MS["cpu"])
        assert not (server.workdir / "key_file.json").exists(), "token authorization must be off"
        r = requests.post(server.predictions_url, data=_bus_jpg(), headers={"Content-Type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text
        # the kservev2 envelope (which KServe's env asks for) would have failed on a raw image body
        assert r.json()["task"] == "pose" and r.json()["detections"]
        # the Open Inference Protocol through a real v2 client, as the KServe wrapper forwards it (no token)
        httpclient = pytest.importorskip("tritonclient.http")
        import numpy as np
        from serving_support import assert_same_response

        client = httpclient.InferenceServerClient(server.inference_url.split("//", 1)[1])
        image = httpclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([_bus_jpg()], dtype=object))
        answer = client.infer("yolo", [image])
        assert_same_response(json.loads(answer.as_numpy("result")[0]), r.json())
