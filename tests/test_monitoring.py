"""The operator's kit (monitoring/): the Grafana dashboard and the Prometheus
alert rules shipped under /usr/share/imgworker/.

- the rules pass ``promtool check rules`` and their unit tests
  (``promtool test rules``: each alert fires on the series meant to trigger
  it and stays quiet on a healthy one);
- every metric name the dashboard or the rules use is one imgworker's API
  really exports, read from a real GET /metrics (RabbitMQ needed, as for
  tests/integration), so that neither can point at a metric renamed away;
- the dashboard is Grafana 10 JSON with the panels the README promises, on
  the Prometheus data source variable only.

promtool comes with Debian's ``prometheus`` package (script/bootstrap): the
tests that need it skip without it on a laptop and FAIL under CI=true.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(REPO, "monitoring", "prometheus", "imgworker-alerts.yml")
RULE_TESTS = os.path.join(REPO, "monitoring", "prometheus", "imgworker-alerts.test.yml")
DASHBOARD = os.path.join(REPO, "monitoring", "grafana", "imgworker.json")

ALERTS = {"ImgworkerBrokerDown", "ImgworkerNoConsumers", "ImgworkerBacklogWillNotDrain",
          "ImgworkerDeadLettersGrowing", "ImgworkerWebhookDeadLettered",
          "ImgworkerWorkerRestarting", "ImgworkerWorkerGone", "ImgworkerUpload5xx",
          "ImgworkerStorageNearlyFull"}

PANELS = {"Uploads by status", "Upload latency", "Jobs by outcome", "Render time",
          "Queue depth and consumers", "Dead letters", "Webhook deliveries", "Broker up",
          "Storage", "Auth refusals by reason", "Erasures"}

#: Metrics a rule uses that imgworker does not export yet: each must be
#: added to imgworker, then taken off this set.
PROPOSED = set()

METRIC = re.compile(r"\bimgworker_\w+")


def promtool():
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (Debian's prometheus package: script/bootstrap)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_promtool(*args):
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    return result.returncode, result.stdout + result.stderr


def rules():
    with open(RULES) as handle:
        return [rule for group in yaml.safe_load(handle)["groups"] for rule in group["rules"]]


def dashboard():
    with open(DASHBOARD) as handle:
        return json.load(handle)


def panel_expressions(board):
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


# -- the rules ----------------------------------------------------------------

def test_the_rules_pass_promtool_check_rules():
    status, output = run_promtool("check", "rules", RULES)
    assert status == 0, output
    assert f"SUCCESS: {len(ALERTS)} rules found" in output, output


def test_the_rules_pass_their_unit_tests():
    status, output = run_promtool("test", "rules", RULE_TESTS)
    assert status == 0, output
    assert "SUCCESS" in output, output


def test_each_alert_waits_has_a_severity_and_justifies_its_threshold():
    found = rules()
    assert {rule["alert"] for rule in found} == ALERTS
    for rule in found:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), rule["alert"]
        assert len(annotations["threshold"]) > 40, rule["alert"]


def test_each_alert_has_a_unit_test_that_fires_it_and_one_that_stays_quiet():
    with open(RULE_TESTS) as handle:
        tests = yaml.safe_load(handle)["tests"]
    fires, quiet = set(), set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
            for expected in case.get("exp_alerts") or []:
                # the annotations are checked too, so their templates render
                assert set(expected.get("exp_annotations", {})) >= \
                    {"summary", "description", "threshold"}, case["alertname"]
    assert fires == ALERTS
    assert quiet == ALERTS


# -- the dashboard -------------------------------------------------------------

def test_the_dashboard_is_grafana_10_json_with_the_panels_promised():
    board = dashboard()
    assert board["schemaVersion"] >= 36          # Grafana 9.4+; 38 is Grafana 10's
    assert board["uid"] == "imgworker"
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles))
    assert PANELS <= set(titles), PANELS - set(titles)
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    for panel in board["panels"]:
        assert panel.get("targets"), panel["title"]


def test_the_dashboard_uses_only_the_prometheus_data_source_variable():
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    wanted = {"type": "prometheus", "uid": "${datasource}"}

    def walk(node, where):
        if isinstance(node, dict):
            if "datasource" in node and not (isinstance(node["datasource"], dict) and
                                              node["datasource"].get("type") == "grafana"):
                assert node["datasource"] == wanted, where
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")
    walk(board["panels"], "panels")
    walk([v for v in board["templating"]["list"] if v["name"] != "datasource"], "templating")
    # no data source named or pinned anywhere: it is chosen when imported
    text = json.dumps(board)
    assert "DS_" not in text and '"uid": "prometheus"' not in text


def test_every_dashboard_expression_is_valid_promql(tmp_path):
    board = dashboard()
    recorded = [{"record": f"imgworker_dashboard:panel{n}",
                 "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".+")}
                for n, (_title, expr) in enumerate(panel_expressions(board))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    status, output = run_promtool("check", "rules", str(path))
    assert status == 0, output


# -- the names, against a real exposition --------------------------------------

def used_names():
    """{name: [files]} of every imgworker_* metric name the kit uses."""
    used = {}
    for path in (DASHBOARD, RULES, RULE_TESTS):
        with open(path) as handle:
            for name in METRIC.findall(handle.read()):
                used.setdefault(name, set()).add(os.path.relpath(path, REPO))
    return used


def count_in(pipeline, calls):
    """Count with imgworker's own metrics module in a process of the
    pipeline's metrics directory, as the webhook sender would: families only
    counted there (webhook outcomes) appear in the API's exposition too."""
    script = ("import sys; from imgworker import config, metrics; "
              "metrics.setup(config.load(sys.argv[1])); " + "; ".join(calls))
    subprocess.run([sys.executable, "-c", script, pipeline.config_path], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": REPO}, timeout=60)


def exported_names(pipeline):
    pipeline.start_api()
    pipeline.start_worker()
    job_id = pipeline.upload(samples.jpeg(640, 480)).json()["id"]
    assert pipeline.upload(data=b"not an image at all",
                           headers={"Content-Type": "image/jpeg"}).status_code == 415
    assert pipeline.wait_job(job_id)["state"] == "done"
    count_in(pipeline, [f"metrics.count_webhook({outcome!r})"
                        for outcome in ("delivered", "retried", "dead")])
    pipeline.cli("sweep")                    # measures the storage for imgworker_stored_*
    response = requests.get(pipeline.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    names = set()
    for family in text_string_to_metric_families(response.text):
        names.add(family.name)              # a counter's family drops _total ...
        names.update(sample.name for sample in family.samples)  # ... its samples keep it;
        # histograms' _bucket/_sum/_count, and _created where it is exported
    return names


def test_every_metric_the_dashboard_and_the_rules_use_is_exported(pipeline):
    exported = exported_names(pipeline)
    # the exposition is the whole contract of imgworker/metrics.py
    assert {"imgworker_uploads_total", "imgworker_upload_seconds_bucket",
            "imgworker_jobs_total", "imgworker_render_seconds_bucket",
            "imgworker_webhook_deliveries_total", "imgworker_queue_messages",
            "imgworker_broker_up", "imgworker_stored_bytes",
            "imgworker_storage_free_bytes"} <= exported, sorted(exported)
    used = used_names()
    missing = {name: sorted(files) for name, files in used.items()
               if name not in exported and name not in PROPOSED}
    assert not missing, f"not in imgworker's GET /metrics: {missing}"
    # and every family imgworker exports is on the dashboard, but for the
    # storage's file counts and measuring time (the sweep's bookkeeping)
    def family(name):
        return re.sub(r"_(bucket|sum|count|total|created)$", "", name)
    shown = {family(name) for name in METRIC.findall(json.dumps(dashboard()))}
    unshown = {family(name) for name in exported} - shown
    assert unshown <= {"imgworker_stored_files",
                       "imgworker_stored_measured_timestamp_seconds"}, unshown


