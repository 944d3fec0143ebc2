"""Deployment files, checked offline: compose and Kubernetes schemas, GPU rendering, documented env vars."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

TRITON_RELEASE_FOR_VERSION = {"2.51.0": "24.10"}  # NGC release that ships each server version
ENV = {"QWEN_TTS_WEIGHTS_DIR": "/srv/models/Qwen3-TTS-12Hz-0.6B-Base",
       "QWEN_TTS_CUSTOM_VOICE_WEIGHTS_DIR": "/srv/models/Qwen3-TTS-12Hz-1.7B-CustomVoice"}
# The two-model deployment compose and Kubernetes show: served name -> its checkpoint's kind and size
TWO_MODELS = {"qwen3-tts-0.6b-base": "Qwen3-TTS-12Hz-0.6B-Base",
              "qwen3-tts-1.7b-custom-voice": "Qwen3-TTS-12Hz-1.7B-CustomVoice"}


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


def test_compose_serves_two_models_each_mounted_read_only(compose):
    """QWEN_TTS_MODELS is well-formed (0.6B-Base first, the default, then 1.7B-CustomVoice) and every model's
    directory is a read-only mount of its own weights; unset, the second mounts the empty placeholder."""
    from tools.render_model_repository import parse_models

    triton = compose["services"]["triton"]
    models = parse_models(triton["environment"]["QWEN_TTS_MODELS"])
    assert [name for name, _ in models] == list(TWO_MODELS)
    mounts = {m["target"]: m for m in triton["volumes"]}
    sources = (ENV["QWEN_TTS_WEIGHTS_DIR"], ENV["QWEN_TTS_CUSTOM_VOICE_WEIGHTS_DIR"])
    for (name, model_dir), source in zip(models, sources):
        assert model_dir == f"/models/{TWO_MODELS[name]}"
        assert mounts[model_dir]["read_only"] is True and mounts[model_dir]["source"] == source
    placeholder = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(),
                                             {"QWEN_TTS_WEIGHTS_DIR": "/w"}))["services"]["triton"]["volumes"]
    source = next(m["source"] for m in placeholder if m["target"] == models[1][1])
    assert (ROOT / source).is_dir() and not (ROOT / source / "config.json").exists()


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


def test_kubernetes_triton_pods_serve_two_models_each_from_its_own_read_only_claim():
    """QWEN_TTS_MODELS is well-formed (0.6B-Base first, then 1.7B-CustomVoice) and every model's directory is a
    read-only mount of its own read-only claim defined in storage.yaml."""
    from tools.render_model_repository import parse_models

    docs = dict(((d["kind"], d["metadata"]["name"]), d) for _, d in k8s_documents())
    pod = docs[("StatefulSet", "qwen-tts-triton")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    models = parse_models(env["QWEN_TTS_MODELS"])
    assert [name for name, _ in models] == list(TWO_MODELS) and "QWEN_TTS_MODEL_DIR" not in env
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = set()
    for name, model_dir in models:
        assert model_dir == f"/models/{TWO_MODELS[name]}" and mounts[model_dir]["readOnly"] is True
        claim = volumes[mounts[model_dir]["name"]]["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        assert docs[("PersistentVolumeClaim", claim["claimName"])]["spec"]["accessModes"] == ["ReadOnlyMany"]
        claims.add(claim["claimName"])
    assert len(claims) == len(models)
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert "storage.yaml" in kustomization["resources"]


def run_entrypoint(tmp_path, **env) -> subprocess.CompletedProcess:
    """docker/triton/entrypoint.sh run here: this checkout for /opt/qwen-tts, a scratch render folder, and a
    stand-in tritonserver that prints the rendered models instead of serving them."""
    script = (ROOT / "docker" / "triton" / "entrypoint.sh").read_text() \
        .replace("cd /opt/qwen-tts", f"cd {ROOT}").replace("/tmp/model_repository", str(tmp_path / "repo"))
    (tmp_path / "entrypoint.sh").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "tritonserver").write_text(f"#!/bin/sh\necho rendered: $(ls {tmp_path / 'repo'})\n")
    (bin_dir / "tritonserver").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_TTS_")}
    return subprocess.run(["bash", str(tmp_path / "entrypoint.sh")], capture_output=True, text=True, timeout=120,
                          env={**base, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{base['PATH']}", "QWEN_TTS_PROFILE": "cpu",
                               "QWEN_TTS_ALIGNER_DIR": "", **env})


def rendered(result: subprocess.CompletedProcess) -> set:
    return set(next(line for line in result.stdout.splitlines() if line.startswith("rendered: ")).split()[1:])


def test_the_triton_entrypoint_renders_every_mounted_model(tmp_path, tiny_model_dir, tiny_custom_voice_dir):
    """The container renders a talker and an ensemble per QWEN_TTS_MODELS model; a later model whose weights are not
    mounted is left out with a note; an unmounted default model stops it with a clear message."""
    both = run_entrypoint(tmp_path, QWEN_TTS_MODELS=f"base={tiny_model_dir},custom={tiny_custom_voice_dir}")
    assert both.returncode == 0, both.stderr
    assert rendered(both) == {"codec_decoder", "voice_encoder", "talker", "tts", "talker_custom", "tts_custom"}
    placeholder = ROOT / "deploy" / "no-model"
    one = run_entrypoint(tmp_path, QWEN_TTS_MODELS=f"base={tiny_model_dir},custom={placeholder}")
    assert one.returncode == 0, one.stderr
    assert f"no weights at {placeholder}: not serving model 'custom'" in one.stderr
    assert rendered(one) == {"codec_decoder", "voice_encoder", "talker", "tts"}
    missing = run_entrypoint(tmp_path, QWEN_TTS_MODELS=f"base={placeholder},custom={tiny_custom_voice_dir}")
    assert missing.returncode != 0 and f"Mount the weights read-only at {placeholder}" in missing.stderr
    bad = run_entrypoint(tmp_path, QWEN_TTS_MODELS=f"Base={tiny_model_dir}")
    assert bad.returncode != 0 and "invalid model name 'Base'" in bad.stderr


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
