"""Deployment files, checked offline: compose and Kubernetes schemas, GPU rendering, documented env vars."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
import yaml

from conftest import ROOT

TRITON_RELEASE_FOR_VERSION = {"2.51.0": "24.10"}  # NGC release that ships each server version
ENV = {"QWEN_TTS_WEIGHTS_DIR": "/srv/models/Qwen3-TTS-12Hz-0.6B-Base"}


def interpolate(text: str, env: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""
    def substitute(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", substitute, text)


@pytest.fixture(scope="module")
def compose_text() -> str:
    return interpolate((ROOT / "docker-compose.yml").read_text(), ENV)


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


def test_compose_file_validates_against_the_compose_spec(compose_text):
    """docker-compose.yml parses and validates against the Compose specification."""
    import compose_spec

    parsed = compose_spec.PyCompose.from_yaml(compose_text)
    parsed.validate()
    assert set(parsed.service_names()) == {"triton", "gateway", "redis", "prometheus", "grafana", "perf"}


def test_compose_validation_rejects_a_broken_file(compose_text):
    """The validator is not a rubber stamp: a wrong type is refused."""
    import compose_spec

    with pytest.raises(ValueError, match="restart"):
        compose_spec.PyCompose.from_yaml(compose_text.replace("restart: unless-stopped", "restart: sometimes", 1))


def test_compose_requires_the_weights_directory():
    """Without QWEN_TTS_WEIGHTS_DIR, compose stops with a message saying what to set."""
    with pytest.raises(ValueError, match="QWEN_TTS_WEIGHTS_DIR"):
        interpolate((ROOT / "docker-compose.yml").read_text(), {})


def test_compose_triton_service_is_a_proper_gpu_triton(compose):
    """GPU reserved, shm set, ports 8000-8002, readiness healthcheck, TTS and aligner weights read-only, voices."""
    triton = compose["services"]["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert triton["shm_size"]
    assert {p.split(":")[1] for p in triton["ports"]} == {"8000", "8001", "8002"}
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    mounts = {m["target"]: m for m in triton["volumes"]}
    assert mounts["/models/Qwen3-TTS-12Hz-0.6B-Base"]["read_only"] is True
    assert mounts["/models/Qwen3-TTS-12Hz-0.6B-Base"]["source"] == ENV["QWEN_TTS_WEIGHTS_DIR"]
    assert mounts["/models/Qwen3-ForcedAligner-0.6B"]["read_only"] is True  # no weights there: no word timestamps
    assert "/voices" in mounts and triton["environment"]["QWEN_TTS_PROFILE"] == "gpu"


def test_compose_gateway_waits_for_healthy_triton_and_extras_are_profiles(compose):
    """The gateway starts once Triton is healthy; Prometheus, Grafana and perf are opt-in profiles on matching images."""
    services = compose["services"]
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["gateway"]["environment"]["TRITON_URLS"] == "triton:8001"
    assert services["prometheus"]["profiles"] == ["monitoring"] == services["grafana"]["profiles"]
    assert services["perf"]["profiles"] == ["perf"]
    base = services["triton"]["build"]["args"]["TRITON_IMAGE"]
    assert services["perf"]["image"] == base.replace("-py3", "-py3-sdk")
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]} == \
        {"triton:8002", "gateway:8080"}


def test_triton_image_matches_the_server_the_tests_run(triton, compose):
    """The compose Triton image is the NGC release of the tritonserver version the tests run against."""
    with urllib.request.urlopen(triton.http_url + "/v2", timeout=5) as response:
        version = json.loads(response.read())["version"]
    release = TRITON_RELEASE_FOR_VERSION[version]
    assert compose["services"]["triton"]["build"]["args"]["TRITON_IMAGE"] == \
        f"nvcr.io/nvidia/tritonserver:{release}-py3"
    assert f"tritonserver:{release}-py3" in (ROOT / "docker" / "triton" / "Dockerfile").read_text()


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.mark.parametrize("name, doc", k8s_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubernetes_manifests_validate(name, doc):
    """Every Kubernetes manifest validates (strictly) against the Kubernetes 1.30 schema."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kubernetes_validation_rejects_a_broken_manifest():
    """The schema check catches a wrong type."""
    import kubernetes_validate

    doc = dict(next(d for _, d in k8s_documents() if d["kind"] == "StatefulSet"))
    doc["spec"] = {**doc["spec"], "replicas": "two"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kubernetes_triton_pods_have_gpus_probes_and_the_gateway_discovers_them():
    """Triton pods request a GPU and have readiness probes; the gateway finds them through the headless Service's
    DNS records, and a leaving pod serves on (preStop) for longer than discovery takes to notice."""
    docs = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in k8s_documents())
    triton = docs[("StatefulSet", "qwen-tts-triton")]
    pod = triton["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    config = docs[("ConfigMap", "qwen-tts-gateway")]["data"]
    service = triton["spec"]["serviceName"]
    assert config["TRITON_URLS"] == f"dns://{service}:8001"
    assert docs[("Service", service)]["spec"]["clusterIP"] == "None"
    linger = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert linger > 2 * float(config["TRITON_DISCOVERY_INTERVAL_S"]) and pod["terminationGracePeriodSeconds"] > linger + 30


def test_kubernetes_autoscaler_scales_triton_on_the_metric_the_adapter_serves():
    """The HorizontalPodAutoscaler targets the Triton StatefulSet on the external metric the Prometheus adapter's
    values define, from the gateway's demand metric."""
    docs = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in k8s_documents())
    hpa = docs[("HorizontalPodAutoscaler", "qwen-tts-triton")]["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("StatefulSet", "qwen-tts-triton")
    adapter = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    rule = adapter["rules"]["external"][0]
    assert hpa["metrics"][0]["external"]["metric"]["name"] == rule["name"]["as"]
    assert "tts_gateway_demand_streams" in rule["metricsQuery"]
    assert hpa["behavior"]["scaleDown"]["policies"][0] == {"type": "Pods", "value": 1, "periodSeconds": 300}
    gateway = docs[("Deployment", "qwen-tts-gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


ENV_PATTERN = re.compile(r"""(?:os\.environ\.get|os\.environ\[|os\.getenv|_int|_float|_json_object)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")


def env_vars_read_by_code() -> set[str]:
    names = set()
    for folder in ("gateway", "tts_engine", "tts_contract", "triton_support", "tools", "client", "bench",
                   "model_repository"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(ENV_PATTERN.findall(path.read_text()))
    names |= set(re.findall(r'"(QWEN_TTS_[A-Z0-9_]+)"', (ROOT / "triton_support" / "params.py").read_text()))
    from tools.render_model_repository import PARAMETERS

    names |= {f"QWEN_TTS_{name}" for name in PARAMETERS}
    return {n for n in names if not n.startswith(("HF_", "TRANSFORMERS_", "PYTHON", "LD_", "PATH"))}


def test_every_environment_variable_the_code_reads_is_documented():
    """Each env var read anywhere in the code (and each template parameter) appears in the README."""
    readme = (ROOT / "README.md").read_text()
    names = env_vars_read_by_code()
    assert len(names) > 25, "the scan found suspiciously few variables"
    missing = sorted(n for n in names if n not in readme and n.removeprefix("QWEN_TTS_") not in readme)
    assert not missing, f"undocumented environment variables: {missing}"


def test_perf_summary_reads_time_to_first_response():
    """The perf driver computes time to first response from a perf_analyzer profile export."""
    from tools.perf import summarise_export

    export = {"experiments": [{"experiment": {"mode": "concurrency", "value": 2},
                               "window_boundaries": [0, 2_000_000_000],
                               "requests": [{"timestamp": 0, "response_timestamps": [50_000_000, 400_000_000]},
                                            {"timestamp": 10, "response_timestamps": [70_000_010, 300_000_010]}]}]}
    row = summarise_export(export)[0]
    assert row["value"] == 2 and row["requests"] == 2
    assert row["ttfr_ms_p50"] == pytest.approx(60.0) and row["last_response_ms_p50"] == pytest.approx(350.0)
    assert row["responses_per_s"] == pytest.approx(2.0)


def test_perf_analyzer_sweep_runs_against_the_local_server(triton, tmp_path):
    """`tools.perf` installs perf_analyzer (private glibc here) and measures time to first response of tts."""
    from tools.perf import main

    out = tmp_path / "perf"
    code = main(["--url", triton.grpc_url, "--models", "tts", "--concurrency", "1", "--max-new-tokens", "8",
                 "--requests", "4", "--out", str(out)])
    assert code == 0
    row = json.loads((out / "summary.json").read_text())["tts"]["1"]
    assert row["requests"] >= 4 and 0 < row["ttfr_ms_p50"] <= row["last_response_ms_p50"]
