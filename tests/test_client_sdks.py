"""The real client SDKs against a real server: lorax-client and the Predibase SDK, unchanged.

They pin versions that clash with the server's, so they live in .venv-clients (made by `make test`)
and run as a subprocess (tests/clients/sdk_checks.py) that reports what the SDKs returned or raised.
"""

import json
import subprocess

import pytest

from tests.adapter_factory import SPECS
from tests.conftest import ADAPTER_PROMPTS, ROOT

CLIENT_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
PROMPT = ADAPTER_PROMPTS[0]
ADAPTER = SPECS[0].name


@pytest.fixture(scope="module")
def report(server) -> dict:
    assert CLIENT_PYTHON.exists(), "the clients environment is missing: run `make test` (it creates .venv-clients)"
    result = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "clients" / "sdk_checks.py"), server.url,
                             f"{ADAPTER}/1", PROMPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("@@REPORT@@")[-1])


def test_lorax_client_generate_matches_peft_with_and_without_adapter(report, references):
    lorax = report["lorax"]
    assert lorax["base"]["token_ids"] == references[(None, PROMPT)]
    assert lorax["adapter"]["token_ids"] == references[(ADAPTER, PROMPT)]
    assert lorax["base"]["prompt_tokens"] == 5 and lorax["base"]["finish_reason"] in ("length", "eos_token")


def test_lorax_client_streams_the_same_tokens(report, references):
    lorax = report["lorax"]
    assert lorax["stream_base"]["ids"] == references[(None, PROMPT)][:12]
    assert lorax["stream_adapter"]["ids"] == references[(ADAPTER, PROMPT)][:12]
    assert lorax["stream_base"]["generated_text"] == "".join(lorax["stream_base"]["texts"])


def test_lorax_client_details_prefill_and_alternatives(report):
    prefill = report["lorax"]["prefill"]["prefill"]
    assert len(prefill) == 5 and prefill[0][1] is None and all(lp < 0 for _, lp in prefill[1:])
    alternatives = report["lorax"]["alternatives"]
    assert all(len(a) == 2 and a[0] == t for a, t in zip(alternatives["alternatives"], alternatives["token_ids"]))


def test_lorax_client_stop_seed_and_best_of(report):
    lorax = report["lorax"]
    assert lorax["stop"]["finish_reason"] == "stop_sequence"
    assert lorax["seeded"][0] == lorax["seeded"][1]
    assert lorax["best_of"]["best_of"] == 1


@pytest.mark.parametrize(
    "case, error_class, words",
    [
        ("too_long", "ValidationError", "less than 1792 tokens"),
        ("too_many_new", "ValidationError", "must be <= 2048"),
        ("too_many_stops", "ValidationError", "up to 4 stop sequences"),
        ("missing_adapter", "GenerationError", "not found"),
        ("foreign_adapter", "GenerationError", "different base model"),
        ("missing_adapter_stream", "GenerationError", "not found"),
    ],
)
def test_lorax_client_raises_its_own_error_classes(report, case, error_class, words):
    error = report["lorax"]["errors"][case]
    assert error["class"] == error_class and words in error["message"]


def test_a_failing_adapter_load_beside_successful_requests(report):
    concurrent = report["lorax"]["concurrent"]
    assert all(concurrent["good"]) and concurrent["bad"]["class"] == "GenerationError"


def test_predibase_sdk_works_unchanged_against_the_local_server(report):
    pb, lorax = report["predibase"], report["lorax"]
    assert pb["base"] and pb["adapter"] and pb["base"] != pb["adapter"]
    assert pb["stream"].startswith("\n\nMachine learning")
    assert pb["unknown_deployment"]["class"] == "NotFoundError"
    assert lorax["stream_base"]["generated_text"].startswith(pb["base"][:20])
