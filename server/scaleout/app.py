"""The Serve application: a gateway bound to the engine replicas, built from loraserve's own settings.

`build_app` is the `import_path` of configs/ray-serve.yaml (also a KubeRay RayService's serveConfigV2)
and what `loraserve serve-ray` deploys. Its `args` are loraserve configuration keys (`config`: a YAML
file; any other key overrides it, as a flag would); replica counts, CPUs and queue limits are Serve's
own deployment options, set in the Serve config or by the CLI.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray.serve import Application

from server.config import Settings, load_settings
from server.scaleout.gateway import Gateway
from server.scaleout.replica import EngineReplica


def settings_of(args: Mapping[str, Any]) -> Settings:
    """The settings every replica runs with: YAML, then LORASERVE_* env vars (where this runs: the
    CLI, or Serve's controller for a config file), then the remaining args."""
    overrides = {k: v for k, v in args.items() if k != "config"}
    return load_settings(args.get("config"), overrides)


def build_app(args: Mapping[str, Any] | None = None, *, settings: Settings | None = None,
              engine_options: Mapping[str, Any] | None = None) -> Application:
    settings = settings or settings_of(args or {})
    engine = EngineReplica.options(**(engine_options or {})).bind(settings)
    return Gateway.bind(engine, settings.http)
