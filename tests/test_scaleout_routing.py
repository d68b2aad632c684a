"""The scale-out gateway's routing decision (route + body -> the multiplexed adapter id) and the
serve-ray flags' meaning, as pure functions: no Ray needed."""

import argparse
import json

import pytest

from server.config import ConfigError, Settings
from server.scaleout.routing import adapter_of, is_generation

BASE = {"SmolLM2-135M-Instruct"}
TENANT = "/tenant-id/deployments/v2/llms/default"


def native(**parameters) -> bytes:
    return json.dumps({"inputs": "hi", "parameters": parameters}).encode()


def openai(model) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize(
    "method, path, body, expected",
    [
        ("POST", "/generate", native(adapter_id="repo/1"), "repo/1"),
        ("POST", "/generate_stream", native(adapter_id="repo/1"), "repo/1"),
        ("POST", "/", native(adapter_id="repo/1"), "repo/1"),  # lorax-client's route
        ("POST", f"{TENANT}/generate", native(adapter_id="repo/1"), "repo/1"),
        ("POST", f"{TENANT}/generate_stream", native(adapter_id="repo/1"), "repo/1"),
        ("POST", f"{TENANT}", native(adapter_id="repo/1"), "repo/1"),  # lorax-client under the tenant path
        ("POST", "/tenant-id/deployments", native(adapter_id="repo/1"), None),
        ("POST", f"{TENANT}/", native(adapter_id="repo/1"), "repo/1"),
        ("POST", "/generate", native(adapter_id="repo/1", adapter_source="pbase"), "repo/1"),
        ("POST", "/generate", native(adapter_id="org/x", adapter_source="hub"), "hub:org/x"),
        ("POST", "/generate", native(adapter_id="s3://b/k", adapter_source="s3"), "s3:s3://b/k"),
        ("POST", "/generate", native(), None),  # the base model: any replica
        ("POST", "/generate", native(adapter_id=""), None),
        ("POST", "/generate", native(adapter_id=None), None),
        ("POST", "/generate", native(adapter_id=7), None),  # the replica answers 422
        ("POST", "/generate", native(merged_adapters={"ids": ["a/1", "b/1"], "weights": [1, 1]}), None),
        ("POST", "/generate", json.dumps({"inputs": "hi"}).encode(), None),
        ("POST", "/generate", json.dumps({"inputs": "hi", "parameters": "x"}).encode(), None),
        ("POST", "/generate", b"{not json", None),
        ("POST", "/generate", b"[1, 2]", None),
        ("POST", "/generate", b"", None),
        ("POST", "/generate", b"\xff\xfe", None),
        ("GET", "/generate", native(adapter_id="repo/1"), None),
        ("POST", "/v1/chat/completions", openai("repo/1"), "repo/1"),
        ("POST", "/v1/completions", openai("repo/1"), "repo/1"),
        ("POST", f"{TENANT}/v1/chat/completions", openai("repo/1"), "repo/1"),
        ("POST", "/v1/chat/completions", openai(""), None),
        ("POST", "/v1/chat/completions", openai("SmolLM2-135M-Instruct"), None),  # the base model by name
        ("POST", "/v1/chat/completions", openai(None), None),
        ("POST", "/v1/chat/completions", openai(["x"]), None),
        ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), None),
        ("POST", "/v1/models", openai("repo/1"), None),
        ("POST", "/v1/chat/completions/extra", openai("repo/1"), None),
        ("POST", "/adapters", native(adapter_id="repo/1"), None),
    ],
)
def test_the_adapter_a_request_is_routed_by(method, path, body, expected):
    assert adapter_of(method, path, body, BASE) == expected


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", "/generate", True), ("POST", "/generate_stream", True), ("POST", "/", True),
        ("POST", "/v1/chat/completions", True), ("POST", f"{TENANT}/v1/completions", True),
        ("POST", "/adapters", False), ("POST", "/v2/repos", False), ("DELETE", "/generate", False),
    ],
)
def test_only_generations_are_retried_on_another_replica(method, path, expected):
    assert is_generation(method, path) is expected


def flags(**kw) -> argparse.Namespace:
    defaults = dict(replicas=1, min_replicas=None, max_replicas=None, num_cpus_per_replica=1.0,
                    num_gpus_per_replica=0.0, max_ongoing_requests=None, max_queued_requests=None)
    return argparse.Namespace(**{**defaults, **kw})


def test_serve_ray_flags_become_the_engine_deployments_options():
    pytest.importorskip("ray")
    from server.scaleout.cli import engine_options

    settings = Settings()
    fixed = engine_options(flags(replicas=2, num_gpus_per_replica=1.0), settings)
    assert fixed == {"num_replicas": 2, "max_ongoing_requests": 32, "max_queued_requests": 128,
                     "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}}
    scaling = engine_options(flags(min_replicas=1, max_replicas=4, max_ongoing_requests=8), settings)
    assert scaling["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert "num_replicas" not in scaling
    for bad in (flags(replicas=0), flags(min_replicas=1), flags(min_replicas=3, max_replicas=2),
                flags(min_replicas=0, max_replicas=0)):
        with pytest.raises(ConfigError):
            engine_options(bad, settings)


def test_the_serve_config_file_is_valid_and_builds_the_application(tmp_path):
    """configs/ray-serve.yaml passes Serve's own schema (what `serve deploy` and KubeRay check) and its
    import_path builds the application from its args, without a cluster."""
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.scaleout.app import build_app
    from tests.conftest import ROOT

    config = yaml.safe_load((ROOT / "configs" / "ray-serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    application = schema.applications[0]
    assert application.import_path == "server.scaleout.app:build_app"
    assert {d.name for d in application.deployments} == {"EngineReplica", "Gateway"}
    app = build_app({**application.args, "adapters_dir": str(tmp_path)})
    assert type(app).__name__ == "Application"
