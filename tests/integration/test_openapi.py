"""doc/openapi.yaml cannot drift from the code: real requests to a running
API, every answer validated against the document (its status listed for the
operation, its content type, its headers, its JSON body against the schema)."""

import os
import re
import subprocess
import time

import jsonschema
import requests
import yaml

from harness import samples
from harness.pipeline import REPO

with open(os.path.join(REPO, "doc", "openapi.yaml")) as handle:
    SPEC = yaml.safe_load(handle)


def resolved(node):
    """The document's node with every local $ref replaced by its target."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = SPEC
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return resolved(target)
        return {key: resolved(value) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value) for value in node]
    return node


CHECKED = set()


def conforms(response, method, path):
    """Assert that a requests.Response is what the document says
    ``method path`` (a path template) may answer."""
    operation = SPEC["paths"][path][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], \
        f"{method} {path} answered {status}, which the document does not list: {response.text}"
    declared = resolved(operation["responses"][status])
    for header in declared.get("headers", {}):
        assert header in response.headers, f"{method} {path} {status} lacks {header}"
    if "content" not in declared:
        assert not response.content, f"{method} {path} {status} has a body the document lacks"
        CHECKED.add((method, path, status))
        return response
    content_type = response.headers["Content-Type"].split(";")[0].strip()
    media = declared["content"]
    match = next((name for name in media if name == content_type
                  or (name.endswith("/*") and content_type.startswith(name[:-1]))), None)
    assert match, f"{method} {path} {status} answered {content_type}, not one of {list(media)}"
    if content_type == "application/json":
        jsonschema.Draft202012Validator(media[match]["schema"]).validate(response.json())
    CHECKED.add((method, path, status))
    return response


def test_the_document_is_a_valid_openapi_3_1_description():
    assert SPEC["openapi"].startswith("3.1")
    for path, operations in SPEC["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                for media in resolved(answer).get("content", {}).values():
                    jsonschema.Draft202012Validator.check_schema(media["schema"])


def test_every_answer_of_the_running_api_is_the_documented_one(make_pipeline):
    origin = "https://app.example"
    pipeline = make_pipeline(api={"max_upload_bytes": "2000000"},
                             auth={"cors_origins": origin})
    app_key = pipeline.add_key("app", "upload,grant")
    upload_key = pipeline.add_key("uploader", "upload")
    pipeline.start_api()
    pipeline.start_worker()
    post = pipeline.upload

    raw = conforms(post(data=samples.jpeg(800, 600), headers={"Content-Type": "image/jpeg"}),
                   "POST", "/upload")
    form = conforms(post(samples.jpeg(640, 480)), "POST", "/upload")
    assert raw.status_code == form.status_code == 202
    bad = conforms(post(data=samples.truncated_jpeg(), headers={"Content-Type": "image/jpeg"}),
                   "POST", "/upload").json()["id"]
    conforms(post(data=b"", headers={"Content-Type": "image/jpeg"}), "POST", "/upload")
    conforms(post(data=b"hello", headers={"Content-Type": "text/plain"}), "POST", "/upload")
    conforms(post(data=samples.png_header_only(70000, 70000),
                  headers={"Content-Type": "image/png"}), "POST", "/upload")
    conforms(post(data=b"\0" * 2_000_001, headers={"Content-Type": "image/jpeg"}),
             "POST", "/upload")
    conforms(pipeline_get(pipeline, "/upload"), "POST", "/upload")        # 405

    # credentials (issue 23): grants, refusals, the CORS preflight
    def grants(body=None, key=app_key, **kwargs):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return conforms(requests.post(pipeline.base_url + "/grants", json=body, headers=headers,
                                      timeout=10, **kwargs), "POST", "/grants")
    grant = grants({"owner": "user-1", "max_bytes": 1000, "ttl": 60})
    assert grant.status_code == 201
    assert grants({"owner": "user-1"}, key=None).status_code == 401
    assert grants({"owner": "user-1"}, key=upload_key).status_code == 403
    assert grants(data=b"{not json").status_code == 400
    assert grants({"max_bytes": 10}).status_code == 422
    bearer = {"Authorization": "Bearer " + grant.json()["grant"]}
    too_large = conforms(post(samples.jpeg(320, 240), headers=bearer), "POST", "/upload")
    assert (too_large.status_code, too_large.json()["reason"]) == (413, "too_large")
    wrong = conforms(post(samples.jpeg(64, 48), headers={"Authorization": "Bearer imgwk_x"}),
                     "POST", "/upload")
    assert (wrong.status_code, wrong.json()["reason"]) == (401, "invalid")
    small = grants({"owner": "user-1"}).json()["upload_url"]
    spent = requests.post(pipeline.base_url + small, files={"file": samples.jpeg(64, 48)},
                          timeout=30)
    assert conforms(spent, "POST", "/upload").status_code == 202
    again = requests.post(pipeline.base_url + small, files={"file": samples.jpeg(64, 48)},
                          timeout=30)
    assert conforms(again, "POST", "/upload").json()["reason"] == "used"
    scoped = conforms(post(samples.jpeg(64, 48), params={"owner": "user-2"},
                           headers={"Authorization": f"Bearer {app_key}", "Origin": origin}),
                      "POST", "/upload")
    assert (scoped.status_code, scoped.headers["Access-Control-Allow-Origin"]) == (202, origin)
    preflight = requests.options(pipeline.base_url + "/upload", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert conforms(preflight, "OPTIONS", "/upload").status_code == 204
    # nginx's auth_request, asked directly
    ask = pipeline.base_url + "/auth/upload"
    assert conforms(requests.get(ask, timeout=10), "GET", "/auth/upload").status_code == 204
    forged = {"X-Original-URI": "/upload?grant=imgwg_x"}
    assert conforms(requests.get(ask, timeout=10, headers=forged),
                    "GET", "/auth/upload").status_code == 401
    assert conforms(requests.get(ask, timeout=10, headers={"Authorization": f"Bearer {app_key}"}),
                    "GET", "/auth/upload").status_code == 204

    queued = conforms(pipeline_get(pipeline, raw.json()["status_url"]), "GET", "/jobs/{id}")
    assert queued.json()["state"] in ("queued", "processing", "done")
    done = pipeline.wait_job(raw.json()["id"])
    failed = pipeline.wait_job(bad)
    assert (done["state"], failed["state"]) == ("done", "failed")
    conforms(pipeline_get(pipeline, raw.json()["status_url"]), "GET", "/jobs/{id}")
    conforms(pipeline_get(pipeline, f"/jobs/{bad}"), "GET", "/jobs/{id}")
    conforms(pipeline_get(pipeline, "/jobs/" + "0" * 32), "GET", "/jobs/{id}")
    for rendition in done["renditions"].values():
        conforms(pipeline_get(pipeline, rendition["url"]), "GET", "/renditions/{id}/{file}")
    conforms(pipeline_get(pipeline, f"/renditions/{bad}/large.jpg"), "GET",
             "/renditions/{id}/{file}")
    conforms(pipeline_get(pipeline, "/healthz"), "GET", "/healthz")
    conforms(pipeline_get(pipeline, "/metrics"), "GET", "/metrics")

    # erasure (issue 24): a key of scope delete; 404 unknown, 410 twice
    eraser = pipeline.add_key("ops", "delete")

    def delete(path, key=eraser):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.delete(pipeline.base_url + path, headers=headers, timeout=30)
    assert conforms(delete(f"/jobs/{bad}", key=None), "DELETE", "/jobs/{id}").status_code == 401
    assert conforms(delete(f"/jobs/{bad}", key=app_key), "DELETE", "/jobs/{id}").status_code == 403
    assert conforms(delete(f"/jobs/{bad}"), "DELETE", "/jobs/{id}").status_code == 200
    assert conforms(delete(f"/jobs/{bad}"), "DELETE", "/jobs/{id}").status_code == 410
    assert conforms(delete("/jobs/" + "0" * 32), "DELETE", "/jobs/{id}").status_code == 404
    assert conforms(pipeline_get(pipeline, f"/jobs/{bad}"), "GET", "/jobs/{id}").status_code == 410
    erased = conforms(delete("/owners/user-2/jobs"), "DELETE", "/owners/{owner}/jobs")
    assert erased.json() == {"owner": "user-2", "erased": 1}

    # the broker's disk alarm: uploads get 503 + Retry-After, and so does /healthz
    rabbitmqctl("set_disk_free_limit", "100000GB")
    try:
        deadline = time.monotonic() + 20
        while "disk" not in rabbitmqctl("-q", "eval", "rabbit_alarm:get_alarms().") \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        refused = conforms(post(samples.jpeg(320, 240)), "POST", "/upload")
        assert refused.status_code == 503
    finally:
        rabbitmqctl("set_disk_free_limit", "50MB")

    answered = {(method, path, status) for method, path, status in CHECKED}
    for status in ("202", "400", "401", "405", "413", "415", "422", "503"):
        assert ("POST", "/upload", status) in answered, status
    for status in ("201", "400", "401", "403", "422"):
        assert ("POST", "/grants", status) in answered, status
    assert ("OPTIONS", "/upload", "204") in answered
    for status in ("200", "401", "403", "404", "410"):
        assert ("DELETE", "/jobs/{id}", status) in answered, status
    assert {("GET", "/jobs/{id}", "200"), ("GET", "/jobs/{id}", "404"),
            ("GET", "/renditions/{id}/{file}", "200"), ("GET", "/renditions/{id}/{file}", "404"),
            ("GET", "/healthz", "200"), ("GET", "/metrics", "200")} <= answered


def rabbitmqctl(*args):
    """The test broker runs on this machine (as in tests/faults)."""
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def pipeline_get(pipeline, path):
    return requests.get(pipeline.base_url + path, timeout=10)


def test_the_documented_formats_and_media_types_are_the_tables():
    from imgworker import formats, job
    outputs = [spec for spec in formats.FORMATS if spec.output]
    served = SPEC["paths"]["/renditions/{id}/{file}"]["get"]["responses"]["200"]["content"]
    assert set(served) == {spec.media_type for spec in outputs}
    schemas = SPEC["components"]["schemas"]
    rendition = schemas["Rendition"]["properties"]
    assert rendition["format"]["enum"] == [spec.name for spec in outputs]
    (extensions,) = re.findall(r"\\\.\(([^)]*)\)\$$", rendition["url"]["pattern"])
    assert extensions.split("|") == [spec.extension for spec in outputs]
    job_schema = schemas["Job"]["properties"]
    assert job_schema["original"]["properties"]["format"]["enum"] == list(formats.UPLOAD_FORMATS)
    assert job_schema["state"]["enum"] == [state.value for state in job.State]


def test_the_api_routes_are_the_documented_paths_and_methods():
    from imgworker.api import _ROUTES
    documented = {(path.replace("{id}", "0" * 32).replace("{file}", "large.jpg"),
                   tuple(sorted(method.upper() for method in operations)))
                  for path, operations in SPEC["paths"].items()}
    for concrete, methods in documented:
        routes = [route for route in _ROUTES if route[0].fullmatch(concrete)]
        assert routes, f"{concrete} is documented but the API has no route for it"
        assert set(methods) <= set(routes[0][1])
    assert len(_ROUTES) == len(documented), "a route the document does not describe"
