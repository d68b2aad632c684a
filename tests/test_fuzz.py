"""An API fuzz run: schemathesis generates valid and invalid requests for every operation in the
server's own /openapi.json and sends them to a real server on loopback. No answer may be a 5xx,
and every error must be JSON in its route family's shape.

Bounded: a few random examples per operation (LORASERVE_FUZZ_EXAMPLES, default 20), derandomized
so CI runs the same cases every time, and a server whose max_total_tokens is 40, so no generation is
long. LORASERVE_FUZZ_COVERAGE=1 adds schemathesis' deterministic boundary cases (its coverage phase:
several hundred more requests, ~3 minutes on 2 cores).
Remote adapter sources stay on loopback: the hub is offline and S3 points at a closed local port.
"""

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from server.api.app import create_app
from server.config import Settings
from tests.conftest import ServerProcess, free_port

EXAMPLES = int(os.environ.get("LORASERVE_FUZZ_EXAMPLES", "20"))
PHASES = [Phase.explicit, Phase.generate] if os.environ.get("LORASERVE_FUZZ_COVERAGE") == "1" else [Phase.generate]


@pytest.fixture(scope="module")
def fuzz_server(loaded, tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")  # the control routes it fuzzes write repos and uploads here
    os.symlink(loaded.model_dir.parent, home / "models", target_is_directory=True)
    env = {"HF_HUB_OFFLINE": "1", "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
           "AWS_ACCESS_KEY_ID": "fuzz", "AWS_SECRET_ACCESS_KEY": "fuzz", "AWS_DEFAULT_REGION": "us-east-1",
           "LORASERVE_ADAPTER_DOWNLOAD_TIMEOUT_S": "5", "LORASERVE_HOME": str(home),
           "LORASERVE_ADAPTERS_DIR": str(home / "adapters")}
    proc = ServerProcess("--max-total-tokens", "40", "--max-input-length", "32", "--max-batch-size", "8",
                         "--max-concurrent-requests", "32", env=env)
    yield proc.wait_ready()
    proc.stop()


def own_openapi() -> dict:
    """The OpenAPI document the server serves, built without loading a model (the app's engine is
    only built at start-up), so the operations are known when pytest collects this module."""
    return create_app(Settings(), factory=lambda settings: None).openapi()


schema = schemathesis.openapi.from_dict(own_openapi())


def test_the_fuzzed_schema_is_the_one_the_server_serves(fuzz_server):
    served = httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    assert served == own_openapi() and len(served["paths"]) >= 20


def assert_error_shape(path: str, status: int, body) -> None:
    if "/v1/" in path:
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], body
    else:
        assert set(body) == {"error", "error_type"} and body["error"], body


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=PHASES,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_error_is_json(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=60)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json"), where
        assert_error_shape(case.formatted_path, response.status_code, json.loads(response.text))
