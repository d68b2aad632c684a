"""Fine-tuning jobs and batch inference over HTTP and the metrics WebSocket, on a live server with an
API key: what the SDK reads when things go right, and the clear 4xx (nothing half-created) or the
job's own error when they don't."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.adapter_factory import SPECS, corrupt_copy
from tests.conftest import ROOT, ServerProcess

KEY = "pb_jobs-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
TERMINAL = ("completed", "errored", "canceled")


def rows(count: int) -> str:
    return "".join(json.dumps({"prompt": f"Colour {i}:", "completion": f" {['red', 'blue'][i % 2]}",
                               "split": "evaluation" if i % 5 == 4 else "train"}) + "\n" for i in range(count))


def upload_dataset(api: httpx.Client, name: str, file_name: str, content: str) -> dict:
    begun = api.post("/v2/datasets/upload", json={"fileName": file_name, "mimeType": "text/plain"}).json()
    httpx.put(begun["presignedUrl"], content=content.encode()).raise_for_status()
    api.put("/v2/datasets/upload", json={"name": name, "uploadToken": begun["uploadToken"]}).raise_for_status()
    return api.get(f"/v1/datasets/name/{name}").json()


def start_server(home: Path, adapters: Path, model_dir: Path) -> ServerProcess:
    if not (home / "models").exists():
        home.mkdir(exist_ok=True)
        os.symlink(model_dir.parent, home / "models", target_is_directory=True)
    env = {"LORASERVE_HOME": str(home), "LORASERVE_ADAPTERS_DIR": str(adapters), "LORASERVE_TRAINING_THREADS": "1"}
    return ServerProcess("--api-key", KEY, "--max-batch-size", "8", env=env).wait_ready()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, loaded, adapter_root):
    work = tmp_path_factory.mktemp("jobs")
    home, adapters = work / "home", work / "adapters"
    adapters.mkdir()
    shutil.copytree(adapter_root / SPECS[0].name / "1", adapters / "known" / "1")
    corrupt_copy(adapter_root / SPECS[0].name / "1", adapters / "broken" / "1")
    server = start_server(home, adapters, loaded.model_dir)
    api = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
    upload_dataset(api, "colours", "colours.jsonl", rows(20))
    batch = [{"custom_id": "base", "url": "/v1/completions", "body": {"model": "", "prompt": "Hi", "max_tokens": 4}},
             {"custom_id": "missing", "url": "/v1/completions",
              "body": {"model": "nope/1", "prompt": "Hi", "max_tokens": 4}},
             {"custom_id": "bad", "url": "/v1/chat/completions",
              "body": {"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -1}},
             {"custom_id": "adapter", "url": "/v1/chat/completions",
              "body": {"model": "known/1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}}]
    upload_dataset(api, "requests", "requests.jsonl", "".join(json.dumps(r) + "\n" for r in batch))
    many = [{"custom_id": f"r{i}", "url": "/v1/completions",
             "body": {"model": "", "prompt": f"Story {i}:", "max_tokens": 64, "ignore_eos_token": True}}
            for i in range(40)]
    upload_dataset(api, "many", "many.jsonl", "".join(json.dumps(r) + "\n" for r in many))
    for repo in ("colours", "broken", "restart"):
        api.post("/v2/repos", json={"name": repo, "existsOk": True}).raise_for_status()
    state = {"server": server, "api": api, "home": home, "adapters": adapters, "model_dir": loaded.model_dir}
    yield state
    state["api"].close()
    state["server"].stop()


def create_job(api: httpx.Client, repo: str, dataset: str = "colours", **params) -> httpx.Response:
    params = {"epochs": 1, "rank": 4, "effective_batch_size": 4, **params}
    return api.post("/v2/finetuning/jobs", json={"params": params, "dataset": dataset, "repo": repo})


def wait_job(api: httpx.Client, job: str, statuses, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(f"/v2/finetuning/jobs/{job}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.3)
    pytest.fail(f"job {job} never reached {statuses}")


def stream(url: str, job: str, headers: dict) -> tuple[list[dict], int]:
    ws_url = url.replace("http://", "ws://") + f"/v2/finetuning/jobs/{job}/metrics/stream"
    with connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
        messages = [json.loads(m) for m in ws]
        return messages, ws.close_code


def test_a_job_streams_its_metrics_and_its_version_serves(setup):
    api, url = setup["api"], setup["server"].url
    created = create_job(api, "colours", train_steps=6)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["targetRepoName"] == "colours" and job["targetVersionTag"] == 1
    assert job["status"] in ("queued", "training")
    assert job["params"]["rank"] == 4 and job["params"]["learning_rate"] == 0.0002  # the documented default filled in
    live, code = stream(url, job["uuid"], AUTH)
    assert code == 1000 and live[-1]["meta"]["is_completed"] is True
    progress = [m for m in live if m["data"].get("checkpoint_number") == 0 and not m["meta"]["is_completed"]]
    assert [m["data"]["steps"] for m in progress] == [1, 2, 3, 4, 5, 6]
    assert all(m["meta"]["total_steps"] == 6 for m in progress)
    assert any(m["data"].get("checkpoint_number", 0) >= 1 and m["data"]["validation_metrics_loss"] for m in live)
    replay, code = stream(url, job["uuid"], AUTH)  # a reconnect gets the whole history again
    assert replay == live and code == 1000
    assert wait_job(api, job["uuid"], TERMINAL)["status"] == "completed"
    version = api.get("/v2/repos/colours/version/1").json()
    assert version["status"] == "completed" and Path(version["adapterPath"]).is_dir()
    generated = api.post("/generate", json={"inputs": "Colour 3:", "parameters": {"adapter_id": "colours/1",
                                                                                 "max_new_tokens": 3}})
    assert generated.status_code == 200
    log = (ROOT / ".pytest_cache" / f"server-{setup['server'].port}.log").read_text()
    assert f"fine-tune job {job['uuid']}: step 6/6" in log and "completed: colours/1" in log


def test_the_metrics_websocket_needs_the_key(setup):
    job = create_job(setup["api"], "colours", train_steps=1).json()
    for headers in ({}, {"authorization": "Bearer wrong-key-123"}):
        with pytest.raises(InvalidStatus) as refused:
            stream(setup["server"].url, job["uuid"], headers)
        assert refused.value.response.status_code == 403
    wait_job(setup["api"], job["uuid"], TERMINAL)


@pytest.mark.parametrize("change, status, words", [
    ({"dataset": "nope"}, 404, "dataset"),
    ({"repo": "never-made"}, 404, "repo"),
    ({"dataset": "requests"}, 400, "batch"),
    ({"params": {"base_model": "meta-llama/Llama-3.1-8B"}}, 400, "serves"),
    ({"params": {"rank": 0}}, 400, "rank"),
    ({"params": {"adapter": "turbo"}}, 400, "adapter"),
    ({"continueFromVersion": "colours/99"}, 404, "not found"),
])
def test_bad_creates_get_a_clear_4xx_and_create_nothing(setup, change, status, words):
    api = setup["api"]
    before = api.get("/v2/repos/broken").json()["versions"]
    body = {"params": {"epochs": 1, **change.pop("params", {})}, "dataset": "colours", "repo": "broken", **change}
    response = api.post("/v2/finetuning/jobs", json=body)
    assert response.status_code == status and words in response.json()["error"]
    assert api.get("/v2/repos/broken").json()["versions"] == before
    assert not (setup["adapters"] / "never-made").exists()


def test_a_job_that_fails_says_why(setup):
    """A broken adapter to continue from: the trainer's own error reaches the job and its version."""
    api = setup["api"]
    job = api.post("/v2/finetuning/jobs", json={"params": {"train_steps": 2}, "dataset": "colours", "repo": "broken",
                                                "continueFromVersion": "broken/1"}).json()
    failed = wait_job(api, job["uuid"], TERMINAL)
    assert failed["status"] == "errored" and failed["error"]
    version = api.get(f"/v2/repos/broken/version/{job['targetVersionTag']}").json()
    assert version["status"] == "errored" and version["finetuningJob"]["error"] == failed["error"]
    assert not version.get("adapterPath")
    assert not list((setup["adapters"] / ".staging").glob("job-*"))


def test_batch_rows_fail_alone(setup):
    api = setup["api"]
    created = api.post("/v2/batch-inference", json={"dataset": "requests", "serverConfig": {"baseModel": ""}})
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["status"] == "queued" and job["originalRequest"]["dataset"] == "requests"
    deadline = time.monotonic() + 120
    while api.get(f"/v2/batch-inference/{job['uuid']}").json()["status"] not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    link = api.get(f"/v2/batch-inference/{job['uuid']}/results").json()["url"]
    results = {r["custom_id"]: r for r in map(json.loads, httpx.get(link).text.splitlines())}
    assert {k: r["response"]["status_code"] for k, r in results.items()} == \
        {"base": 200, "missing": 404, "bad": 400, "adapter": 200}
    assert results["adapter"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(link).status_code == 410  # the link was single-use


def test_batch_refuses_training_rows_and_other_models(setup):
    api = setup["api"]
    training = api.post("/v2/batch-inference", json={"dataset": "colours", "serverConfig": {}})
    assert training.status_code == 400 and "batch rows" in training.json()["error"]
    other = api.post("/v2/batch-inference", json={"dataset": "requests", "serverConfig": {"baseModel": "gpt-4"}})
    assert other.status_code == 400 and "serves" in other.json()["error"]


def test_a_batch_can_be_canceled(setup):
    api = setup["api"]
    job = api.post("/v2/batch-inference", json={"dataset": "many", "serverConfig": {}}).json()
    while api.get(f"/v2/batch-inference/{job['uuid']}").json()["status"] == "queued":
        time.sleep(0.1)
    assert api.post(f"/v2/batch-inference/{job['uuid']}/cancel").status_code == 200
    final = api.get(f"/v2/batch-inference/{job['uuid']}").json()
    assert final["status"] == "canceled" and final["rowsCompleted"] < 40
    assert api.post(f"/v2/batch-inference/{job['uuid']}/cancel").status_code == 409
    assert api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_a_restart_errors_the_job_it_cut_short(setup):
    """It restarts the module's server (the tests after it use the new one). A job training when the
    server stops can't resume."""
    api = setup["api"]
    job = create_job(api, "restart", epochs=50).json()
    wait_job(api, job["uuid"], ("training",))
    setup["server"].stop()
    setup["server"] = start_server(setup["home"], setup["adapters"], setup["model_dir"])
    setup["api"].close()
    setup["api"] = api = httpx.Client(base_url=setup["server"].url, headers=AUTH, timeout=60)
    after = api.get(f"/v2/finetuning/jobs/{job['uuid']}").json()
    assert after["status"] == "errored" and "server" in after["error"]
    assert not (setup["adapters"] / "restart" / str(job["targetVersionTag"])).exists()
    messages, code = stream(setup["server"].url, job["uuid"], AUTH)
    assert code == 1000 and messages[-1]["meta"]["is_completed"] is True


def test_the_openai_sdk_batch_api(setup, tmp_path):
    """openai's files.create -> batches.create -> retrieve -> files.content, on the same runner."""
    from openai import OpenAI

    client = OpenAI(base_url=setup["server"].url + "/v1", api_key=KEY)
    body = {"model": "known/1", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6,
            "temperature": 0}
    rows = [{"custom_id": "adapter", "method": "POST", "url": "/v1/chat/completions", "body": body},
            {"custom_id": "missing", "method": "POST", "url": "/v1/chat/completions",
             "body": {**body, "model": "nope/1"}}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    uploaded = client.files.create(file=(tmp_path / "rows.jsonl").open("rb"), purpose="batch")
    assert uploaded.bytes == (tmp_path / "rows.jsonl").stat().st_size
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.total == 2 and batch.request_counts.failed == 1
    results = {r["custom_id"]: r for r in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    live = client.chat.completions.create(**body)
    assert results["adapter"]["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    assert results["missing"]["response"]["status_code"] == 404
    assert batch.id in [b.id for b in client.batches.list()]
    wrong = setup["api"].post("/v1/batches", json={"input_file_id": uploaded.id, "endpoint": "/v1/completions",
                                                   "completion_window": "24h"})
    assert wrong.status_code == 400 and "endpoint" in wrong.json()["error"]["message"]
