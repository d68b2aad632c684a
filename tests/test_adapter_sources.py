"""Adapters over real HTTP from every source: pbase, local roots, a hub cache, and a real S3 server."""

import boto3
import httpx
import pytest

from tests.adapter_factory import SPECS
from tests.conftest import ADAPTER_PROMPTS, NEW_TOKENS, S3_ENV


def generate(client, adapter_id, source=None, prompt=ADAPTER_PROMPTS[0]) -> httpx.Response:
    params = {"max_new_tokens": NEW_TOKENS, "details": True, "adapter_id": adapter_id}
    if source:
        params["adapter_source"] = source
    return client.post("/generate", json={"inputs": prompt, "parameters": params})


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_pbase_adapter_matches_peft_and_reports_headers(client, references):
    r = generate(client, f"{SPECS[1].name}/1")
    assert token_ids(r) == references[(SPECS[1].name, ADAPTER_PROMPTS[0])]
    assert r.headers["x-adapter-id"] == f"{SPECS[1].name}/1" and r.headers["x-adapter-source"] == "pbase"
    base = client.post("/generate", json={"inputs": ADAPTER_PROMPTS[0],
                                          "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}})
    assert token_ids(base) == references[(None, ADAPTER_PROMPTS[0])]


def test_local_source_reads_only_inside_the_roots(client, references, extra_root, tmp_path):
    expected = references[(SPECS[0].name, ADAPTER_PROMPTS[0])]
    assert token_ids(generate(client, "team/attn", "local")) == expected
    assert token_ids(generate(client, str(extra_root / "team" / "attn"), "local")) == expected
    outside = tmp_path / "outside"
    outside.mkdir()
    (extra_root / "escape").symlink_to(outside, target_is_directory=True)
    for bad in ["../x", "team/../../etc", "%2e%2e/%2e%2e/etc", "/etc", str(outside), "escape"]:
        r = generate(client, bad, "local")
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error_type"] == "validation"


def test_hub_source_works_offline_from_a_populated_cache(client, references):
    r = generate(client, "loraserve-test/mlp-r16", "hub")
    assert token_ids(r) == references[(SPECS[2].name, ADAPTER_PROMPTS[0])]
    missing = generate(client, "loraserve-test/not-cached", "hub")
    assert missing.status_code == 424 and "not found" in missing.json()["error"]


def test_s3_source_against_a_real_s3_server(client, references, adapter_root, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **{
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"]})
    s3.create_bucket(Bucket="adapters")
    for f in (adapter_root / SPECS[1].name / "1").iterdir():
        s3.upload_file(str(f), "adapters", f"team/all-r32/{f.name}")
    r = generate(client, "s3://adapters/team/all-r32", "s3")
    assert token_ids(r) == references[(SPECS[1].name, ADAPTER_PROMPTS[0])]
    assert r.headers["x-adapter-source"] == "s3"
    missing = generate(client, "s3://adapters/team/nothing-here")
    assert missing.status_code == 424 and "not found" in missing.json()["error"]


@pytest.mark.parametrize(
    "adapter_id, status, words",
    [("no-such/1", 424, "not found"), ("corrupt/1", 424, "corrupt"), ("foreign/1", 424, "different base model"),
     ("a/b/c", 422, "repo/version")],
)
def test_bad_adapters_get_clear_errors_in_the_native_shape(client, adapter_id, status, words):
    r = generate(client, adapter_id)
    assert r.status_code == status and words in r.json()["error"]
    assert r.json()["error_type"] == ("generation" if status == 424 else "validation")


def test_unknown_source_is_a_validation_error(client):
    r = generate(client, "x/1", "ftp")
    assert r.status_code == 422 and "adapter_source" in r.json()["error"]


def test_management_routes_list_load_and_unload(client):
    name = f"{SPECS[2].name}/1"
    loaded = client.post("/adapters/load", json={"adapter_id": name})
    assert loaded.status_code == 200 and loaded.json()["rank"] == SPECS[2].rank
    listed = {a["id"]: a for a in client.get("/adapters").json()["adapters"]}
    assert "cpu" in listed[name]["tiers"] and listed[name]["size_bytes"] > 0
    assert listed["corrupt/1"]["tiers"] == ["disk"]  # known in the store, never loaded
    token_ids(generate(client, name))
    assert "device" in {a["id"]: a for a in client.get("/adapters").json()["adapters"]}[name]["tiers"]
    assert client.post("/adapters/unload", json={"adapter_id": name}).json()["unloaded"] is True
    after = {a["id"]: a for a in client.get("/adapters").json()["adapters"]}
    assert after[name]["tiers"] == ["disk"]
    assert client.post("/adapters/load", json={"adapter_id": "no-such/9"}).status_code == 424
