"""The control plane's resources (repos, versions, uploads, datasets, deployments) against a real
server with an API key: the real Predibase SDK end to end (tests/clients/control_sdk_checks.py),
then httpx for what the SDK never shows (tokens, limits, leftovers, tags)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import AdapterConfig, ControlConfig, Settings
from tests.adapter_factory import SPECS
from tests.conftest import ROOT, ServerProcess

CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
API_KEY = "pb_control_test_key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADAPTER = SPECS[0].name  # attn-r8: 1.9 MB, under the server's 5 MB upload cap
PROMPT = "What is machine learning?"


@pytest.fixture(scope="module")
def store(tmp_path_factory, adapter_root, loaded) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("control")
    (base / "home").mkdir()
    os.symlink(loaded.model_dir.parent, base / "home" / "models", target_is_directory=True)
    shutil.copytree(adapter_root / ADAPTER, base / "adapters" / ADAPTER)  # a repo dropped in by hand
    return {"home": base / "home", "adapters": base / "adapters", "work": base}


@pytest.fixture(scope="module")
def control_server(store) -> Iterator[ServerProcess]:
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    env = {"LORASERVE_HOME": str(store["home"]), "LORASERVE_ADAPTERS_DIR": str(store["adapters"]),
           "LORASERVE_MAX_UPLOAD_MB": "5"}
    proc = ServerProcess("--api-key", API_KEY, "--max-batch-size", "4", env=env).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(control_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=control_server.url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def report(control_server, store, adapter_root) -> dict:
    assert CLIENT_PYTHON.exists(), "the clients environment is missing: run `make test` (it creates .venv-clients)"
    work = store["work"] / "sdk"
    work.mkdir()
    result = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "clients" / "control_sdk_checks.py"),
                             control_server.url, API_KEY, str(adapter_root / ADAPTER / "1"), "other-org/Llama-3-8B",
                             str(work)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("@@REPORT@@")[-1])


def upload_adapter(api: httpx.Client, repo: str, source: Path) -> httpx.Response:
    """The SDK's three-step adapter upload, by hand: pre-signed PUTs carry no Authorization."""
    begun = api.post("/v2/adapters/upload", json={"repo": repo}).json()
    for path in source.iterdir():
        if path.name in begun["presignedUrls"]:
            httpx.put(begun["presignedUrls"][path.name], content=path.read_bytes()).raise_for_status()
    return api.put("/v2/adapters/upload/", json={"uploadToken": begun["uploadToken"]})


def generate(api: httpx.Client, adapter_id: str | None, deployment: str = "default") -> httpx.Response:
    parameters = {"max_new_tokens": 16, **({"adapter_id": adapter_id} if adapter_id else {})}
    return api.post(f"/local/deployments/v2/llms/{deployment}/generate", json={"inputs": PROMPT,
                                                                              "parameters": parameters})


# -- the real SDK ---------------------------------------------------------------------------------
def test_sdk_starts_without_warnings_and_manages_repos(report):
    repos = report["repos"]
    assert report["warnings"] == []  # the full subscription object parses cleanly
    assert repos["first_uuid"] == repos["again_uuid"] and repos["description"] == "made by the SDK"
    assert repos["duplicate"]["class"] == "RuntimeError" and "409" in repos["duplicate"]["message"]
    assert repos["by_uuid"] == "sdk-repo"
    assert {"sdk-repo", ADAPTER} <= set(repos["listed"])  # the hand-dropped directory is a repo


def test_sdk_datasets_upload_check_and_download(report):
    datasets = report["datasets"]
    assert datasets["from_file"] == ["qa", "connected", "file_uploads"]
    assert datasets["from_frame"] == ["frame", "connected"]
    assert datasets["get_uuid_matches"] and datasets["downloaded_equal"]
    assert datasets["bad"]["class"] == "ValueError"
    assert datasets["bad"]["message"] == ("Dataset connection failed: line 2 is not valid JSON: "
                                          "Expecting property name enclosed in double quotes")
    assert "409" in datasets["duplicate"]["message"]


def test_sdk_uploaded_adapter_generates_like_the_same_files_served_from_disk(report, api):
    adapters = report["adapters"]
    assert adapters["uploaded"]["id"] == "sdk-repo/1" and adapters["uploaded"]["base"] == "SmolLM2-135M-Instruct"
    assert Path(adapters["uploaded"]["path"]).is_absolute()
    from_disk = generate(api, f"{ADAPTER}/1").json()["generated_text"]
    assert adapters["adapter_text"] == from_disk != adapters["base_text"]
    assert adapters["zip_names"] == ["adapter_config.json", "adapter_model.safetensors"]


def test_sdk_archive_hides_a_version_that_still_serves_and_delete_unloads_it(report):
    adapters = report["adapters"]
    assert adapters["versions_archived"] == [] and adapters["versions_unarchived"] == [1]
    assert adapters["archived_text"] == adapters["adapter_text"]
    assert adapters["after_delete"] == {"class": "GenerationError", "message": "adapter sdk-repo/1 not found"}
    assert "404" in adapters["get_deleted"]["message"]
    assert adapters["second_tag"] == 2  # the deleted tag is not handed out again


def test_sdk_deployments(report):
    deployments = report["deployments"]
    assert deployments["listed"] == [deployments["served"], "default"]
    assert deployments["created"] == deployments["get_alias"] == "sdk-alias"
    assert deployments["listed_after_create"] == [deployments["served"], "default", "sdk-alias"]
    other_base = deployments["other_base"]["message"]
    assert "400" in other_base and "this server serves SmolLM2-135M-Instruct" in other_base
    assert "400" in deployments["delete_configured"]["message"]
    assert "404" in deployments["get_deleted"]["message"]


# -- httpx: what the SDK does not show ------------------------------------------------------------
def test_control_routes_need_the_key_but_presigned_urls_do_not(control_server, api):
    assert httpx.get(control_server.url + "/v2/repos").status_code == 401
    assert httpx.post(control_server.url + "/v2/datasets/upload", json={"fileName": "a.csv"}).status_code == 401
    url = api.post("/v2/datasets/upload", json={"fileName": "a.csv", "mimeType": "text/csv"}).json()["presignedUrl"]
    assert httpx.put(url, content=b"prompt,completion\nhi,there\n").status_code == 200  # no header at all


def test_a_presigned_url_works_once_and_an_unknown_one_never(control_server, api):
    begun = api.post("/v2/datasets/upload", json={"fileName": "once.jsonl", "mimeType": "text/plain"}).json()
    row = b'{"prompt": "a", "completion": "b"}\n'
    assert httpx.put(begun["presignedUrl"], content=row).status_code == 200
    again = httpx.put(begun["presignedUrl"], content=row)
    assert again.status_code == 410 and "already been used" in again.json()["error"]
    unknown = httpx.put(control_server.url + "/v2/_blobs/not-a-token", content=row)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown pre-signed URL"
    assert api.put("/v2/datasets/upload", json={"name": "once", "uploadToken": begun["uploadToken"]}).json()[
        "status"] == "connected"
    reused = api.put("/v2/datasets/upload", json={"name": "once-again", "uploadToken": begun["uploadToken"]})
    assert reused.status_code == 404 and "already used" in reused.json()["error"]
    assert api.get("/v1/datasets/name/once-again").status_code == 404


def test_an_oversize_upload_gets_413_and_leaves_no_file(api, store):
    begun = api.post("/v2/datasets/upload", json={"fileName": "big.jsonl", "mimeType": "text/plain"}).json()
    chunks = (b"x" * 65536 for _ in range(96))  # 6 MB, streamed without a Content-Length
    response = httpx.put(begun["presignedUrl"], content=chunks)
    assert response.status_code == 413 and "max_upload_mb (5 MB)" in response.json()["error"]
    assert not list((store["home"] / "control" / "datasets").rglob("big.jsonl"))
    register = api.put("/v2/datasets/upload", json={"name": "big", "uploadToken": begun["uploadToken"]})
    assert register.status_code == 400 and "nothing was uploaded" in register.json()["error"]


def test_a_wrong_base_adapter_is_refused_and_leaves_nothing_behind(api, store, adapter_root):
    assert api.post("/v2/repos", json={"name": "foreign-repo"}).status_code == 200
    response = upload_adapter(api, "foreign-repo", adapter_root / "foreign" / "1")
    assert response.status_code == 400 and "different base model" in response.json()["error"]
    assert api.get("/v2/repos/foreign-repo").json()["versions"] == []
    assert not (store["adapters"] / "foreign-repo").exists()
    assert not list((store["adapters"] / ".staging").glob("upload-*"))


def test_tags_are_never_reused(api, store, adapter_root):
    source = adapter_root / ADAPTER / "1"
    assert upload_adapter(api, "tags", source).json()["tag"] == 1
    assert api.delete("/v2/repos/tags/version/1").status_code == 200
    assert upload_adapter(api, "tags", source).json()["tag"] == 2
    assert api.delete("/v2/repos/tags").status_code == 200 and not (store["adapters"] / "tags").exists()
    assert api.get("/v2/repos/tags").status_code == 404
    assert upload_adapter(api, "tags", source).json()["tag"] == 3  # the repo was made again: still no reuse
    shutil.copytree(source, store["adapters"] / "tags" / "7")  # a version copied in by hand
    assert [v["tag"] for v in api.get("/v2/repos/tags").json()["versions"]] == [3, 7]
    assert upload_adapter(api, "tags", source).json()["tag"] == 8


def test_a_hand_copied_version_reads_as_completed(api, store):
    version = api.get(f"/v2/repos/{ADAPTER}/version/1").json()
    assert version["status"] == "completed" and version["finetuningJob"] is None
    assert version["adapterPath"] == str((store["adapters"] / ADAPTER / "1").resolve())
    assert api.get(f"/v2/repos/{ADAPTER}/version/9").status_code == 404


def test_an_api_made_deployment_serves_generation(api):
    assert generate(api, None, "made-here").status_code == 404
    created = api.post("/v2/deployments", json={"name": "made-here", "config": {"baseModel": "smollm2-135m-instruct"}})
    assert created.status_code == 200 and created.json()["data"]["status"] == "ready"
    assert generate(api, None, "made-here").json()["generated_text"] == generate(api, None).json()["generated_text"]
    events = api.get("/llms/made-here/events")
    assert events.status_code == 200 and events.json()["ComputeEvents"][0]["eventType"] == "Ready"


# -- in process: what needs a clock or a job runner -----------------------------------------------
class FakeJobs:
    """A job runner with one job training into `busy`."""

    def status_of(self, job_uuid: str):
        return {"job-1": ("training", None)}.get(job_uuid)

    def repo_busy(self, repo_name: str) -> bool:
        return repo_name == "busy"


@pytest.fixture
def bare_app(tmp_path, monkeypatch) -> Iterator[TestClient]:
    """The app without a model (the control routes that need none answer), its home under tmp."""
    monkeypatch.setenv("LORASERVE_HOME", str(tmp_path / "home"))
    settings = Settings(adapters=AdapterConfig(adapters_dir=str(tmp_path / "adapters")),
                        control=ControlConfig(max_upload_mb=1))

    def no_model(settings, *, progress):
        raise RuntimeError("no model in this test")

    with TestClient(create_app(settings, no_model, on_load_failure=lambda exc: None)) as client:
        yield client


def test_an_expired_presigned_url_is_refused(bare_app):
    bare_app.app.state.control.blobs.ttl_s = 0.05
    url = bare_app.post("/v2/datasets/upload", json={"fileName": "late.csv"}).json()["presignedUrl"]
    time.sleep(0.1)
    response = bare_app.put(url.removeprefix(str(bare_app.base_url)), content=b"prompt,completion\na,b\n")
    assert response.status_code == 410 and "expired" in response.json()["error"]


def test_a_reserved_version_reports_its_job_until_its_directory_exists(bare_app, tmp_path):
    plane = bare_app.app.state.control
    plane.jobs = FakeJobs()
    tag = plane.repos.reserve_version("busy", "SmolLM2-135M-Instruct", "job-1", "a fine-tune")
    version = bare_app.get(f"/v2/repos/busy/version/{tag}").json()
    assert (tag, version["status"], version["adapterPath"]) == (1, "training", None)
    assert version["finetuningJob"] == {"uuid": "job-1", "error": None}
    assert bare_app.delete(f"/v2/repos/busy/version/{tag}").status_code == 409
    assert bare_app.delete("/v2/repos/busy").status_code == 403
    assert plane.repos.reserve_version("busy", "SmolLM2-135M-Instruct", "job-2", None) == 2
    assert bare_app.get("/v2/repos/busy/version/2").json()["status"] == "errored"  # a job nobody knows
    assert bare_app.post("/v2/adapters/upload", json={"repo": "busy"}).status_code == 200
    assert bare_app.put("/v2/adapters/upload/", json={"uploadToken": "x"}).status_code == 503  # model loading
