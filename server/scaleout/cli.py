"""`loraserve serve-ray`: the app as Ray Serve replicas, on a local Ray cluster this command starts
and stops (every process of it, on SIGTERM or Ctrl-C), or deployed onto a running cluster (--address)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from server.config import ConfigError, Settings
from server.errors import ExitCode, StartupError, one_line

log = logging.getLogger("server")
APP_NAME = "loraserve"
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # requests and responses are small; Ray would take 30% of RAM


def engine_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Serve's options for the engine deployment, from the flags (pure; validated here, exit 2 if bad)."""
    autoscaling = args.min_replicas is not None or args.max_replicas is not None
    if autoscaling and (args.min_replicas is None or args.max_replicas is None):
        raise ConfigError("--min-replicas and --max-replicas go together")
    if autoscaling and not 0 <= args.min_replicas <= args.max_replicas or args.max_replicas == 0:
        raise ConfigError("need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1; got {args.replicas}")
    ongoing = args.max_ongoing_requests or settings.limits.max_batch_size  # spill over beyond one batch
    queued = args.max_queued_requests or settings.limits.max_concurrent_requests
    options: dict[str, Any] = {
        "max_ongoing_requests": ongoing, "max_queued_requests": queued,
        "ray_actor_options": {"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica},
    }
    if autoscaling:
        options["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                         "target_ongoing_requests": max(1, ongoing // 2)}
    else:
        options["num_replicas"] = args.replicas
    return options


def absolute_paths(settings: Settings) -> Settings:
    """Replicas do not run in this directory: relative adapter paths are made absolute here."""
    adapters = dataclasses.replace(
        settings.adapters, adapters_dir=str(Path(settings.adapters.adapters_dir).resolve()),
        adapter_roots=tuple(str(Path(root).resolve()) for root in settings.adapters.adapter_roots))
    return dataclasses.replace(settings, adapters=adapters)


def run_serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    from server.__main__ import bind_socket, report_start_failure

    try:
        options = engine_options(args, settings)
    except ConfigError as exc:
        print(f"loraserve: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    settings = absolute_paths(settings)
    if args.address is None:
        try:  # a busy port fails now, not after Ray and the model have started
            bind_socket(settings.http.host, settings.http.port).close()
        except StartupError as exc:
            return report_start_failure(exc)
    return _deploy(args, settings, options)


def _deploy(args: argparse.Namespace, settings: Settings, options: dict[str, Any]) -> int:
    import ray
    from ray import serve

    from server.scaleout.app import build_app

    local = args.address is None
    if local:
        loopback = settings.http.host in ("127.0.0.1", "localhost", "::1")
        if loopback:  # replicas inherit it: their metrics ports stay on loopback too
            os.environ.setdefault("LORASERVE_RAY_METRICS_HOST", "127.0.0.1")
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, configure_logging=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, _metrics_export_port=args.metrics_export_port,
                 **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
    else:
        ray.init(address=args.address, configure_logging=False)
    stop = threading.Event()  # after ray.init: its core worker installs a SIGTERM handler that aborts
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.http.host, "port": settings.http.port})
        log.info("deploying %s on Ray Serve: %s", APP_NAME, options)
        serve.run(build_app(settings=settings, engine_options=options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d through Ray Serve", settings.http.host, settings.http.port)
        if not local:
            return ExitCode.OK  # the cluster keeps serving: `serve shutdown` (or `serve delete loraserve`) stops it
        stop.wait()
        log.info("stopping: draining replicas, then the local Ray cluster")
        return ExitCode.OK
    except Exception as exc:
        log.error("Ray Serve deployment failed", exc_info=exc)
        print(f"loraserve: cannot start on Ray Serve: {one_line(exc)}", file=sys.stderr)
        return ExitCode.CANNOT_START
    finally:
        if local:
            _stop_local(serve, ray)


def _stop_local(serve, ray) -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()  # this process started the cluster: its GCS, raylet and workers all end here
