"""Checks of the Helm chart in helm/modstream without a cluster.

helm lints and renders the chart; core objects (and the Ray pod templates, as
Pods) are validated against Kubernetes' own schemas by kubernetes-validate; the
KubeRay and Strimzi resources against the openAPIV3Schema of their CRDs, copied
into tests/fixtures/crds (see its README for source and licence). The tools come
from .ci/install-tools.sh (see tests/helm_tools.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from common.config import env_var_name, load_settings
from tests.helm_tools import CRDS_DIR, REPO_ROOT, Helm, require_tool

CHART = REPO_ROOT / "helm" / "modstream"
GPU_VALUES = CHART / "values-gpu.yaml"
KUBE_VERSION = "1.33.0"
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("kafka.strimzi.io/v1", "KafkaTopic"): "strimzi-043-Crd-kafkatopic.yaml",
    ("kafka.strimzi.io/v1", "KafkaUser"): "strimzi-044-Crd-kafkauser.yaml",
}
# The metric names of the observability contract; alerts may only use these.
CONTRACT_METRICS = {
    "modstream_events_consumed_total", "modstream_verdicts_total", "modstream_dead_letters_total",
    "modstream_dedup_lookups_total", "modstream_stage_latency_seconds", "modstream_classifier_batch_size",
    "modstream_classifier_errors_total", "modstream_inflight_batches", "modstream_consumer_lag",
    "modstream_bundle_info",
}
RENDERS = {"default": [], "gpu": ["-f", str(GPU_VALUES)]}


# --- tools and renders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(require_tool("helm", "HELM"), tmp_path_factory.mktemp("helm-home"))


def template(helm: Helm, *args: str) -> subprocess.CompletedProcess[str]:
    return helm.run("template", "modstream", str(CHART), "--kube-version", KUBE_VERSION, *args)


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    """Each named render's objects."""
    renders = {}
    for name, args in RENDERS.items():
        result = template(helm, *args)
        assert result.returncode == 0, result.stderr
        renders[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return renders


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = objects(docs, kind)
    return found


def pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Ray group name -> pod template ("head" for the head group)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({group["groupName"]: group["template"] for group in cluster.get("workerGroupSpecs", [])})
    return templates


def serve_deployments(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return {deployment["name"]: deployment for deployment in app["deployments"]}


def chart_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(the(docs, "ConfigMap")["data"]["config.yaml"])


# --- CRD schemas ---------------------------------------------------------------------------------------

def crd_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as JSON Schema.

    The API server prunes fields its schema does not know, so a misspelt field
    would vanish silently; here it is an error (additionalProperties: false)
    unless the schema preserves unknown fields. CEL rules
    (x-kubernetes-validations) are dropped: they need a cluster.
    """
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: crd_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = crd_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [crd_json_schema(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for (api_version, kind), filename in CRD_FILES.items():
        crd = yaml.safe_load((CRDS_DIR / filename).read_text())
        group, version = api_version.split("/")
        assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, filename
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
        validators[(api_version, kind)] = jsonschema.Draft7Validator(
            crd_json_schema(served["schema"]["openAPIV3Schema"]))
    return validators


def test_crd_converter_is_strict_and_knows_int_or_string() -> None:
    schema = crd_json_schema({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
            "maybe": {"type": "string", "nullable": True},
        },
    })
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"port": 8080, "free": {"anything": 1}, "maybe": None})
    assert validator.is_valid({"port": "http"})
    assert not validator.is_valid({"port": 1.5})
    assert not validator.is_valid({"prot": 8080})


# --- helm lint, schema and cross-field checks ----------------------------------------------------------

@pytest.mark.parametrize("render", RENDERS)
def test_helm_lint_passes_strict(helm: Helm, render: str) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *RENDERS[render])
    assert result.returncode == 0, result.stdout + result.stderr


# Values go in as JSON (--set-json): plain --set would turn 0.95 into a string.
@pytest.mark.parametrize(("setting", "complaint"), [
    ("ray.cpuWorkers.replicas=-1", "at '/ray/cpuWorkers/replicas': minimum"),
    ("config.classifier.num_replicas=-1", "at '/config/classifier/num_replicas': minimum"),
    ("config.thresholds.block=1.5", "at '/config/thresholds/block': maximum"),
    ('image.repository=""', "at '/image/repository': minLength"),
    ('config.kafka.sasl_password="hunter2"', "additional properties 'sasl_password' not allowed"),
    ('config.kafka.bootstrap=""', "at '/config/kafka/bootstrap': minLength"),
])
def test_values_schema_rejects_bad_values(helm: Helm, setting: str, complaint: str) -> None:
    for command in ("template", "lint"):
        args = ["modstream"] if command == "template" else []
        result = helm.run(command, *args, str(CHART), "--set-json", setting)
        assert result.returncode != 0, f"helm {command} accepted {setting}"
        output = result.stdout + result.stderr
        assert "schema" in output and complaint in output, output


@pytest.mark.parametrize(("settings", "complaint"), [
    (["config.thresholds.block=0.5", "config.thresholds.review=0.95"], "config.thresholds.review must not exceed"),
    (["config.classifier.num_gpus=1"], "needs ray.gpuWorkers.enabled"),
    (['config.kafka.security_protocol="SASL_SSL"'], "kafkaAuth.existingSecret"),
    (["ray.cpuWorkers.minReplicas=3"], "ray.cpuWorkers needs minReplicas <= replicas <= maxReplicas"),
    (["config.classifier.autoscaling=true", "config.classifier.min_replicas=5"],
     "min_replicas must not exceed"),
])
def test_template_rejects_inconsistent_values(helm: Helm, settings: list[str], complaint: str) -> None:
    result = template(helm, *[arg for setting in settings for arg in ("--set-json", setting)])
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


def test_values_files_match_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    validator.validate(defaults)
    validator.validate(deep_merge(defaults, yaml.safe_load(GPU_VALUES.read_text())))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


# --- rendered objects against Kubernetes and CRD schemas -----------------------------------------------

@pytest.mark.parametrize("render", RENDERS)
def test_core_objects_and_pod_templates_pass_kubernetes_validate(
        rendered: dict[str, list[dict[str, Any]]], render: str, tmp_path: Path) -> None:
    tool = require_tool("kubernetes-validate")
    docs = rendered[render]
    core = [doc for doc in docs if doc["apiVersion"] == "v1"]
    assert {doc["kind"] for doc in core} == {"ConfigMap", "ServiceAccount"}
    # KubeRay copies each group's template into real Pods: check them as Pods too.
    for group, pod in pod_templates(the(docs, "RayService")).items():
        core.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {**pod["metadata"], "name": f"modstream-{group}"}, "spec": pod["spec"]})
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([tool, "--kubernetes-version", KUBE_VERSION, "--strict", str(manifest)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(core), result.stdout


@pytest.mark.parametrize("render", RENDERS)
def test_custom_resources_match_their_crds(
        rendered: dict[str, list[dict[str, Any]]], crd_validators: dict[tuple[str, str], Any],
        render: str) -> None:
    checked = 0
    for doc in rendered[render]:
        validator = crd_validators.get((doc["apiVersion"], doc["kind"]))
        if validator is None:
            continue
        errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
                  for error in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"
        checked += 1
    assert checked == (1 if render == "default" else 8)


def test_object_names_are_valid_kubernetes_names(rendered: dict[str, list[dict[str, Any]]]) -> None:
    name = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    for doc in rendered["gpu"]:
        assert name.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63, doc["metadata"]


# --- what the renders contain --------------------------------------------------------------------------

def test_default_render_serves_the_pipeline_on_cpus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    assert {doc["kind"] for doc in docs} == {"ConfigMap", "ServiceAccount", "RayService", "NetworkPolicy"}
    rayservice = the(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert [group["groupName"] for group in cluster["workerGroupSpecs"]] == ["cpu"]
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "deploy.serve_app:app_builder"
    assert app["args"] == {"config_file": "/etc/modstream/config.yaml"}
    deployments = serve_deployments(rayservice)
    assert deployments["PipelineController"]["num_replicas"] == 1
    # The app builder derives the Classifier's options from config.classifier; the chart sets none.
    assert "Classifier" not in deployments
    assert app["name"] == "modstream"
    for pod in pod_templates(rayservice).values():
        for container in pod["spec"]["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_gpu_render_requests_gpus_for_the_classifier(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rayservice = the(rendered["gpu"], "RayService")
    gpu_pod = pod_templates(rayservice)["gpu"]
    (container,) = gpu_pod["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0-gpu")
    assert gpu_pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in gpu_pod["spec"]["tolerations"]
    assert "Classifier" not in serve_deployments(rayservice)  # its options come from config.classifier


@pytest.mark.parametrize("render", RENDERS)
def test_config_map_is_a_valid_modstream_config(
        rendered: dict[str, list[dict[str, Any]]], render: str, tmp_path: Path) -> None:
    """The ConfigMap loads with modstream's own loader, values mapped one-to-one."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if render == "gpu":
        values = deep_merge(values, yaml.safe_load(GPU_VALUES.read_text()))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(the(rendered[render], "ConfigMap")["data"]["config.yaml"])
    settings = load_settings(config_file=config_file, env={})
    assert settings.kafka.bootstrap == values["config"]["kafka"]["bootstrap"]
    assert settings.classifier.max_batch_size == values["config"]["classifier"]["max_batch_size"]
    assert settings.classifier.num_gpus == values["config"]["classifier"]["num_gpus"]
    assert settings.topics.state_prefix == values["config"]["topics"]["state_prefix"]
    assert settings.limits.file_roots == tuple(values["config"]["limits"]["file_roots"])
    assert settings.metrics_port == 9100
    assert settings.classifier.app_name == yaml.safe_load(
        the(rendered[render], "RayService")["spec"]["serveConfigV2"])["applications"][0]["name"]
    assert settings.kafka.sasl_password is None
    if render == "default":
        assert settings.kafka.sasl_mechanism is None and settings.kafka.ssl_cafile is None
    else:  # derived from the KafkaUser and the CA secret
        assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka.sasl_username == "modstream"
        assert settings.kafka.ssl_cafile == "/etc/modstream-kafka-tls/ca.crt"


def test_kafka_password_comes_from_the_kafka_user_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu"]
    user = the(docs, "KafkaUser")
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    password_var = env_var_name("kafka", "sasl_password")
    for group, pod in pod_templates(the(docs, "RayService")).items():
        (container,) = pod["spec"]["containers"]
        env = {var["name"]: var for var in container["env"]}
        # Strimzi writes the user's password to a Secret named after the user, key "password".
        assert env[password_var]["valueFrom"]["secretKeyRef"] == {
            "name": user["metadata"]["name"], "key": "password"}, group
        assert {"name": "kafka-ca", "mountPath": "/etc/modstream-kafka-tls", "readOnly": True} in \
            container["volumeMounts"]
    for doc in rendered["default"]:
        assert password_var not in json.dumps(doc)


@pytest.mark.parametrize("render", RENDERS)
def test_every_container_is_non_root_and_bounded(
        rendered: dict[str, list[dict[str, Any]]], render: str) -> None:
    rayservice = the(rendered[render], "RayService")
    containers = []
    for group, pod in pod_templates(rayservice).items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, group
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, group
        assert spec["automountServiceAccountToken"] is (group == "head"), group
        containers += [(group, container) for container in spec["containers"]]
        mounts = {mount["mountPath"] for c in spec["containers"] for mount in c["volumeMounts"]}
        assert {"/etc/modstream", "/tmp", "/dev/shm"} <= mounts, group
        for container in spec["containers"]:  # the default bundle is built on first use: somewhere writable
            assert {"name": "MODSTREAM_HOME", "value": "/tmp/modstream"} in container["env"], group
    containers.append(("autoscaler", rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]))
    for name, container in containers:
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys(), (name, bound)
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name


def test_kafka_topics_cover_event_and_state_topics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu"]
    topics = chart_config(docs)["topics"]
    specs = {topic["spec"]["topicName"]: topic["spec"] for topic in objects(docs, "KafkaTopic")}
    state = {f"{topics['state_prefix']}.dedup", f"{topics['state_prefix']}.references"}
    events = {topics[key] for key in ("uploads", "verdicts", "reviews", "dlq")}
    assert specs.keys() == events | state
    for name, spec in specs.items():
        assert spec["partitions"] == topics["partitions"] and spec["replicas"] == topics["replication_factor"]
        if name in state:
            assert spec["config"]["cleanup.policy"] == "compact", name
        else:
            assert "retention.ms" in spec["config"], name
    for topic in objects(docs, "KafkaTopic") + objects(docs, "KafkaUser"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"


def test_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu"]
    monitor = the(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ports = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    assert ports == {"app-metrics", "metrics"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    metrics_port = chart_config(docs)["metrics_port"]
    for group, pod in pod_templates(the(docs, "RayService")).items():
        assert selector.items() <= pod["metadata"]["labels"].items(), group
        (container,) = pod["spec"]["containers"]
        assert {"name": "app-metrics", "containerPort": metrics_port, "protocol": "TCP"} in container["ports"]


def test_prometheus_rule_carries_the_alerts_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = the(rendered["gpu"], "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]


# --- plain files ---------------------------------------------------------------------------------------

def alert_rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]:
        yield from group["rules"]


def test_alerts_are_complete_and_use_contract_metrics() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        assert {"alert", "expr", "for", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        metrics = {re.sub(r"_(bucket|sum|count)$", "", name)
                   for name in re.findall(r"\bmodstream_[a-z_]+", rule["expr"])}
        assert metrics <= CONTRACT_METRICS, (rule["alert"], metrics - CONTRACT_METRICS)
        used |= metrics
    # lag growing, DLQ rate, p99 latency, no verdicts, classifier errors
    assert {"modstream_consumer_lag", "modstream_dead_letters_total", "modstream_stage_latency_seconds",
            "modstream_verdicts_total", "modstream_classifier_errors_total"} <= used


def test_readme_is_generated_from_current_values() -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "helm" / "gen_readme.py"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_every_value_is_documented() -> None:
    sys.path.insert(0, str(REPO_ROOT / "helm"))
    try:
        import gen_readme
    finally:
        sys.path.remove(str(REPO_ROOT / "helm"))
    text = (CHART / "values.yaml").read_text()
    documented = {entry.path for entry in gen_readme.parse_values(text)}

    def undocumented(node: Any, path: tuple[str, ...]) -> Iterator[str]:
        if path in documented and not any(p[: len(path)] == path and p != path for p in documented):
            return  # a documented leaf covers whatever lies below it
        if path and path not in documented:
            yield ".".join(path)
        if isinstance(node, dict):
            for key, value in node.items():
                yield from undocumented(value, (*path, key))

    assert list(undocumented(yaml.safe_load(text), ())) == []


def test_chart_yaml_files_pass_yamllint() -> None:
    tool = require_tool("yamllint")
    files = [CHART / "Chart.yaml", CHART / "values.yaml", GPU_VALUES, CHART / "files" / "alerts.yaml"]
    result = subprocess.run([tool, "--strict", "-c", str(REPO_ROOT / "helm" / ".yamllint.yaml"),
                             *map(str, files)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint() -> None:
    tool = require_tool("hadolint")
    dockerfiles = [REPO_ROOT / "deploy" / "Dockerfile", REPO_ROOT / "deploy" / "Dockerfile.cpu"]
    result = subprocess.run([tool, "--failure-threshold", "info", *map(str, dockerfiles)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- network isolation of the Ray pods (NetworkPolicy, dashboard address) ---------------------------------

def _network_policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == "NetworkPolicy")


@pytest.mark.parametrize("render", RENDERS)
def test_network_policy_admits_only_the_release_the_operator_and_the_scraper(
        rendered: dict[str, list[dict[str, Any]]], render: str) -> None:
    docs = rendered[render]
    spec = _network_policy(docs)["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selected = spec["podSelector"]["matchLabels"]
    for group, pod in pod_templates(the(docs, "RayService")).items():
        assert selected.items() <= pod["metadata"]["labels"].items(), f"{group} pods are not isolated"
    own, operator, scraper = spec["ingress"]
    # Ray nodes of this release: any port, but the peer is a pod of this release in this namespace only.
    assert own == {"from": [{"podSelector": {"matchLabels": selected}}]}
    assert operator["from"] == [{"namespaceSelector": {},
                                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert scraper["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert {port["port"] for port in scraper["ports"]} == {chart_config(docs)["metrics_port"], 8080}
    ray_ports = {6379, 8265, 10001, 8000}
    assert not ray_ports & {port["port"] for port in scraper["ports"]}
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without peers admits every pod in the cluster"


def test_network_policy_passes_kubernetes_validate(rendered: dict[str, list[dict[str, Any]]],
                                                   tmp_path: Path) -> None:
    tool = require_tool("kubernetes-validate")
    manifest = tmp_path / "networkpolicy.yaml"
    manifest.write_text(yaml.safe_dump(_network_policy(rendered["default"])))
    result = subprocess.run([tool, "--kubernetes-version", KUBE_VERSION, "--strict", str(manifest)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "passed" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("render", RENDERS)
def test_ray_dashboard_listens_on_the_pod_address(rendered: dict[str, list[dict[str, Any]]], render: str) -> None:
    rayservice = the(rendered[render], "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$MY_POD_IP"  # KubeRay's bash expands it
    (container,) = head["template"]["spec"]["containers"]
    env = {var["name"]: var for var in container["env"]}
    assert env["MY_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # Kubernetes expands $(MY_POD_IP): serve status and ray job inside the pod find the dashboard.
    assert env["RAY_DASHBOARD_ADDRESS"]["value"] == "http://$(MY_POD_IP):8265"
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        command = " ".join(probe["exec"]["command"])
        assert "http://${MY_POD_IP}:8265/api/gcs_healthz" in command and "localhost:8265" not in command
    for group, pod in pod_templates(rayservice).items():
        if group != "head":  # workers run no dashboard: nothing changes there
            (worker,) = pod["spec"]["containers"]
            assert "MY_POD_IP" not in {var["name"] for var in worker["env"]} and "readinessProbe" not in worker


def test_network_policy_and_dashboard_address_can_be_relaxed(helm: Helm) -> None:
    result = template(helm, "--set", "networkPolicy.enabled=false", "--set", "ray.head.dashboardHost=0.0.0.0")
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert not objects(docs, "NetworkPolicy")
    head = the(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "readinessProbe" not in head["template"]["spec"]["containers"][0]  # KubeRay's own probes apply

    result = template(helm, "--set", "networkPolicy.prometheus.enabled=false",
                      "--set-json", 'networkPolicy.extraIngress=[{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], '
                                    '"ports": [{"port": 8000}]}]')
    assert result.returncode == 0, result.stderr
    ingress = _network_policy([doc for doc in yaml.safe_load_all(result.stdout) if doc])["spec"]["ingress"]
    assert len(ingress) == 3 and ingress[-1]["ports"] == [{"port": 8000}]


def test_dashboard_host_is_set_in_one_place_only(helm: Helm) -> None:
    result = template(helm, "--set", "ray.head.rayStartParams.dashboard-host=0.0.0.0")
    assert result.returncode != 0 and "/ray/head/rayStartParams/dashboard-host" in result.stderr


@pytest.mark.parametrize("render", RENDERS)
def test_serve_options_come_from_one_place(rendered: dict[str, list[dict[str, Any]]], render: str,
                                           tmp_path: Path) -> None:
    """The Classifier's Serve options are what workers.classifier derives from the ConfigMap's settings."""
    from deploy.serve_app import app_builder
    from workers.classifier import classifier_options

    config_file = tmp_path / "config.yaml"
    config_file.write_text(the(rendered[render], "ConfigMap")["data"]["config.yaml"])
    settings = load_settings(config_file=config_file, env={})
    application = app_builder({"config_file": str(config_file)})
    (classifier,) = [arg for arg in application._bound_deployment.init_args if hasattr(arg, "_bound_deployment")]
    deployment = classifier._bound_deployment
    expected = classifier_options(settings.classifier, settings.pipeline.poll_records)
    assert deployment.max_ongoing_requests == expected["max_ongoing_requests"]
    assert deployment.ray_actor_options["num_gpus"] == settings.classifier.num_gpus
    assert deployment.user_config == expected["user_config"]
    if settings.classifier.autoscaling:  # values-gpu.yaml: 64-image batches of 32-image requests: target 2
        target = expected["autoscaling_config"]["target_ongoing_requests"]
        assert deployment._deployment_config.autoscaling_config.target_ongoing_requests == target == \
            settings.classifier.max_batch_size / settings.pipeline.poll_records
