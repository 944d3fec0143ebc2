"""Monitoring shipped with the service: the alert rules and the Grafana dashboard, checked with promtool, against
the metrics a real gateway and tritonserver expose, and evaluated by a real Prometheus scraping them."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from gateway_helpers import collect, open_session, receive_json, send, serve_gateway
from tools.triton_local import free_port
from triton_helpers import scrape_metrics

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_DOC = ROOT / "docs" / "ALERTS.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "qwen-tts.json"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs "
                                                              "Debian's prometheus package, which ships it)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (scripts/setup.sh "
                                                                 "installs Debian's prometheus package)")

# -- PromQL: which metric names an expression reads -------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "atan2"}
# Grafana's interval variables, given values a 1 s-scrape Prometheus can evaluate.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
SERIES_PROMETHEUS_MAKES = {"up"}  # written by Prometheus for every target, not exposed by it
SERIES_SUFFIXES = ("", "_bucket", "_sum", "_count", "_total", "_created")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")  # range selectors and subqueries: durations only
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_OFFSET = re.compile(r"\boffset\s+-?\w+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-f]+|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def as_promql(expr: str) -> str:
    """A panel's query with Grafana's variables replaced, as Prometheus can run it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label names or durations."""
    text = _STRING.sub('""', as_promql(expr))
    assert "$" not in text, f"unknown Grafana variable in {expr!r}"  # it would pass for a metric name
    text = _MATCHERS.sub(" ", text)  # label names and values
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)  # by (le), on (job, instance), group_left (x)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    return {name for name, call in _IDENTIFIER.findall(text) if not call and name.lower() not in KEYWORDS}


def exposed_names(exposition: str) -> set[str]:
    """Every family and sample name in a Prometheus text exposition, families without samples included."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def is_exposed(name: str, exposed: set[str]) -> bool:
    """A name is exposed as itself, or as a family whose series it is (counters' _total, histograms' _bucket...)."""
    return name in exposed or any(name == family + suffix for family in exposed for suffix in SERIES_SUFFIXES)


def unknown_names(expressions: list[tuple[str, str]], exposed: set[str], defined: set[str]) -> dict[str, list[str]]:
    """Names the expressions read that are neither exposed nor defined (recorded, or made by Prometheus), with
    where each is used."""
    unknown: dict[str, list[str]] = {}
    for where, expr in expressions:
        for name in sorted(metric_names(expr)):
            if name not in defined and not is_exposed(name, exposed):
                unknown.setdefault(name, []).append(where)
    return unknown


# -- the shipped files --------------------------------------------------------------------------------------

def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> list[tuple[str, str]]:
    return [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]


def adapter_expressions() -> list[tuple[str, str]]:
    """The Prometheus adapter's queries behind the Triton autoscaler's external metric."""
    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    return [(f"adapter metric {rule['name']['as']!r}", rule["metricsQuery"]) for rule in values["rules"]["external"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard_panels(panels=None) -> list[dict]:
    """Every panel, those inside (collapsed) rows included."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"] if panels is None else panels:
        found.append(panel)
        found += dashboard_panels(panel.get("panels", []))
    return found


def panel_expressions() -> list[tuple[str, str]]:
    return [(f"panel {panel['title']!r}", target["expr"]) for panel in dashboard_panels()
            for target in panel.get("targets", [])]


# -- the extractor, on expressions and an exposition written here ---------------------------------------------

def test_extractor_finds_metric_names_and_nothing_else():
    """Functions, keywords, label names and values, durations and numbers are not taken for metric names."""
    expr = ('histogram_quantile(0.95, sum by (le, job) (rate(a_bucket{code="RATE_LIMITED", le!="1"}[5m] offset 1h)))'
            ' > bool 1e3 and on (instance) group_left (x) b_total unless ignoring (a) c:recorded:5m'
            ' or sum(rate(d_total[$__rate_interval])) without (code) / max_over_time(e[1h:5m]) * -0.5'
            ' + label_replace(f, "dst", "$1", "src", "(.*)") > inf')
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded:5m", "d_total", "e", "f"}


def test_checker_reports_a_misspelt_metric_name():
    """A name no exposition has (a typo) is reported with its rule; counters' _total and histograms' series pass."""
    exposition = ("# HELP tts_gateway_errors_total Errors\n# TYPE tts_gateway_errors_total counter\n"
                  "# HELP ttfa_seconds First audio\n# TYPE ttfa_seconds histogram\n"
                  'ttfa_seconds_bucket{le="+Inf"} 1.0\nttfa_seconds_count 1.0\nttfa_seconds_sum 0.1\n')
    expressions = [("TypoAlert", "sum(rate(tts_gateway_underuns_total[5m])) > 0"),
                   ("Fine", 'histogram_quantile(0.5, rate(ttfa_seconds_bucket[5m])) + rate(tts_gateway_errors_total'
                            '{code="X"}[5m]) + up + my:recorded')]
    assert unknown_names(expressions, exposed_names(exposition), {"up", "my:recorded"}) == \
        {"tts_gateway_underuns_total": ["TypoAlert"]}


# -- the rules file ---------------------------------------------------------------------------------------

@needs_promtool
def test_alert_rules_pass_promtool_check():
    """`promtool check rules` accepts alerts.yml."""
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_when_they_should_in_promtool_unit_tests():
    """alerts_test.yml's synthetic series make the alerts fire (after their `for:`, with their annotations) or not."""
    result = subprocess.run([PROMTOOL, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test():
    """alerts_test.yml expects each alert of alerts.yml to fire somewhere (and names no alert that does not exist)."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    checked = [case for test in tests for case in test.get("alert_rule_test", [])]
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {case["alertname"] for case in checked if case["exp_alerts"]} == alerts
    assert {case["alertname"] for case in checked} <= alerts


@needs_promtool
def test_compose_prometheus_config_loads_the_rules():
    """prometheus.yml is valid and loads alerts.yml, and compose mounts alerts.yml next to it."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "alerts.yml" in result.stdout, result.stdout + result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {m["target"]: m["source"] for m in compose["services"]["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"


def test_every_alert_has_severity_annotations_and_a_documented_runbook():
    """Each alert has a severity, summary, description and a runbook at README#alerts; docs/ALERTS.md explains it."""
    documented = set(re.findall(r"^## (\w+)$", ALERTS_DOC.read_text(), re.MULTILINE))
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"].endswith("#alerts"), rule["alert"]
    assert documented == {rule["alert"] for rule in alerts}


# -- the dashboard ----------------------------------------------------------------------------------------

def test_dashboard_is_well_formed_and_provisioned():
    """Schema 39, unique ids, every panel and query on the DS_PROMETHEUS data source whose default is the
    provisioned one, and the provider reads the folder compose mounts."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"]
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    datasource = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["uid"] == variable["current"]["value"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["expr"]
                                        for t in panel["targets"]), panel["title"]
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "qwen-tts.yml").read_text())["providers"][0]
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {m["target"]: m for m in grafana["volumes"]}
    assert mounts[provider["options"]["path"]]["source"] == "./deploy/grafana/dashboards"
    assert all(m["read_only"] for m in mounts.values())


def test_dashboard_shows_what_operators_need():
    """The dashboard reads first audio, underruns, streams, step time, decoder batches, errors, readiness,
    real-time factor, audio rate, the autoscaling signal and sessions."""
    used = set().union(*(metric_names(expr) for _, expr in panel_expressions()))
    assert {"tts_gateway_time_to_first_audio_seconds_bucket", "tts_gateway_underruns_total",
            "tts_gateway_stall_seconds_total", "qwen_tts_talker_active_streams", "qwen_tts_talker_queued_streams",
            "qwen_tts_talker_step_seconds_total", "qwen_tts_talker_steps_total",
            "qwen_tts_decoder_chunks_total", "qwen_tts_decoder_batches_total", "tts_gateway_errors_total",
            "tts_gateway_triton_ready", "tts_gateway_real_time_factor_bucket", "tts_gateway_audio_seconds_total",
            "tts_gateway_realtime_utilization", "tts_gateway_demand_streams", "tts_gateway_endpoint_headroom_streams",
            "tts_gateway_endpoints", "tts_gateway_active_sessions"} <= used


# -- against the live stack ---------------------------------------------------------------------------------

async def speak_once(gateway, text: str = "Checking the monitoring.") -> None:
    """One utterance through the gateway's WebSocket, to its end."""
    async with open_session(gateway.ws) as ws:
        assert (await receive_json(ws))["type"] == "ready"
        await send(ws, type="start", sampleRate=24000, encoding="pcm16", language="English")
        assert (await receive_json(ws))["type"] == "started"
        await send(ws, type="speak", text=text, requestId="monitoring")
        assert (await collect(ws, timeout=60)).end["type"] == "complete"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ValueError, KeyError):  # not listening yet, or answering 503 until its storage is open
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def sample_value(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@pytest.fixture(scope="module")
def stack(triton, voices_dir, tmp_path_factory):
    """A gateway in front of the session's tritonserver, after one utterance (so histograms and labelled
    counters have series on both sides)."""
    for gateway in serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("monitoring-gateway")):
        asyncio.run(speak_once(gateway))
        # Triton's models publish their metrics a few times a second, from their own threads.
        wait_for(lambda: sample_value(scrape_metrics(triton.metrics_url), "qwen_tts_talker_frames_total") > 0,
                 10, "the talker's frame counter on Triton's metrics port")
        yield gateway, triton


def exposition(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_every_metric_the_rules_and_dashboard_read_is_exposed(stack):
    """Each metric name in a rule, a panel or the autoscaler's adapter query is on the gateway's or Triton's /metrics (or recorded by a rule, or
    Prometheus's own `up`)."""
    gateway, triton = stack
    exposed = exposed_names(exposition(gateway.http + "/metrics")) | exposed_names(exposition(triton.metrics_url))
    expressions = rule_expressions() + panel_expressions() + adapter_expressions()
    assert unknown_names(expressions, exposed, recorded_names() | SERIES_PROMETHEUS_MAKES) == {}


def api(base: str, path: str, **params) -> dict:
    """A Prometheus HTTP API call (form-encoded POST where there are parameters); errors come back as JSON too."""
    data = urllib.parse.urlencode(params).encode() if params else None
    try:
        with urllib.request.urlopen(base + path, data=data, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    """A real Prometheus scraping the test gateway and Triton every second and evaluating alerts.yml every second;
    ready once both targets are up."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (scripts/setup.sh installs Debian's prometheus package)")
    gateway, triton = stack
    work = tmp_path_factory.mktemp("prometheus")
    metrics_host = urllib.parse.urlsplit(triton.metrics_url).netloc
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": [metrics_host]}]},
                                 {"job_name": "gateway",
                                  "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    process = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def targets_up():
            assert process.poll() is None, f"prometheus exited; see {work / 'prometheus.log'}"
            active = api(base, "/api/v1/targets")["data"]["activeTargets"]
            return len(active) == 2 and all(t["health"] == "up" for t in active) and active
        wait_for(targets_up, 30, "Prometheus to scrape both targets")
        yield base, gateway
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def test_prometheus_scrapes_the_gateway_and_triton(prometheus):
    """Both targets, generated like the compose config's jobs, are up with no scrape error."""
    base, _ = prometheus
    active = api(base, "/api/v1/targets")["data"]["activeTargets"]
    assert {t["labels"]["job"]: (t["health"], t["lastError"]) for t in active} == \
        {"triton": ("up", ""), "gateway": ("up", "")}


def test_every_rule_and_panel_expression_evaluates(prometheus):
    """Prometheus runs each rule's, each panel's and the autoscaler adapter's query without an error."""
    base, _ = prometheus
    failures = {}
    for where, expr in rule_expressions() + panel_expressions() + adapter_expressions():
        answer = api(base, "/api/v1/query", query=as_promql(expr))
        if answer.get("status") != "success":
            failures[where] = answer.get("error")
    assert failures == {}


def test_every_rule_is_healthy_in_prometheus(prometheus):
    """/api/v1/rules lists every rule of alerts.yml, each evaluated with health ok."""
    base, _ = prometheus
    expected = {rule.get("alert") or rule["record"] for rule in rules()}

    def evaluated():
        loaded = [rule for group in api(base, "/api/v1/rules")["data"]["groups"] for rule in group["rules"]]
        return all(rule["health"] != "unknown" for rule in loaded) and loaded
    loaded = wait_for(evaluated, 15, "every rule to be evaluated once")
    assert {rule["name"] for rule in loaded} == expected
    assert {rule["name"]: rule.get("lastError", "") for rule in loaded if rule["health"] != "ok"} == {}


def test_first_audio_quantile_is_recorded_for_an_utterance_spoken_while_scraped(prometheus):
    """An utterance spoken while Prometheus scrapes gives the p95 first-audio recording rule a positive value."""
    base, gateway = prometheus
    asyncio.run(speak_once(gateway, "Once more, while Prometheus watches."))

    def p95():
        result = api(base, "/api/v1/query", query="qwen_tts:time_to_first_audio_seconds:p95_5m")["data"]["result"]
        return result and float(result[0]["value"][1]) > 0 and float(result[0]["value"][1])
    assert 0 < wait_for(p95, 20, "the p95 first-audio recording rule to have a value") < 10
