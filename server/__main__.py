"""Command line: `loraserve serve [...]` (also `python -m server serve`)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys

from server.config import ConfigError, HttpConfig, ModelConfig, Settings, load_settings
from server.errors import ExitCode, StartupError, one_line
from server.logs import configure as configure_logging
from server.model.model_dir import local_model_dir

log = logging.getLogger("server")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOG_FORMATS = ("text", "json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API", epilog=(
        "exit codes: 0 stopped by SIGTERM/SIGINT; 2 invalid configuration; 3 the engine loop died; 4 cannot "
        "start (the reason is the last line on stderr); 5 unexpected error while starting (a bug)"))
    add_serve_flags(serve)
    serve_ray = sub.add_parser("serve-ray", help="serve the HTTP API as replicas on Ray Serve (loraserve[ray])",
                               epilog="docs/scale-out.md: routing, multi-node commands, what changes")
    add_serve_flags(serve_ray)
    add_ray_flags(serve_ray)
    return parser


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help='"default", a local HF model directory, or a hub id')
    serve.add_argument("--device", choices=["cpu", "cuda", "auto"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--threads", type=int, help="torch CPU threads (0 = all cores)")
    serve.add_argument("--cuda-graph-max-batch-size", type=int, help="CUDA: graph decode steps up to this size")
    serve.add_argument("--quantize", choices=["none", "int8"], help="CPU: int8 weight copies for small decode steps")
    serve.add_argument("--kv-cache", choices=["auto", "paged", "dense"], help="KV-cache layout (auto: paged on CPU)")
    serve.add_argument("--tool-call-parser", choices=["auto", "hermes", "llama3_json", "mistral", "json"],
                       help="how replies' native tool calls are read (auto: from the chat template)")
    serve.add_argument("--reasoning-parser", choices=["auto", "think", "none"],
                       help="<think>...</think> as reasoning_content (auto: when the chat template thinks)")
    serve.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const", const=False,
                       help="do not reuse cached KV blocks of a shared prompt prefix")
    for name in ("max_input_length", "max_total_tokens", "max_batch_total_tokens", "max_batch_prefill_tokens",
                 "max_batch_size", "max_concurrent_requests", "max_stop_sequences", "max_stop_sequence_length",
                 "max_best_of", "max_active_adapters", "max_adapter_memory_mb", "max_cpu_adapters", "max_queue_wait_s",
                 "adapter_download_timeout_s", "kv_cache_memory_mb", "kv_block_size"):
        serve.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    serve.add_argument("--api-key", dest="api_keys", action="append",
                       help="accept this bearer token (repeat for several; default: no auth)")
    serve.add_argument("--log-level", type=str.lower, choices=_LOG_LEVELS,
                       default=os.environ.get("LORASERVE_LOG_LEVEL", "info").lower())
    serve.add_argument("--log-format", choices=_LOG_FORMATS, default=os.environ.get("LORASERVE_LOG_FORMAT", "text"))


RAY_FLAGS = ("replicas", "min_replicas", "max_replicas", "num_cpus_per_replica", "num_gpus_per_replica",
             "max_ongoing_requests", "max_queued_requests", "address", "num_cpus", "metrics_export_port")


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("Ray Serve")
    ray.add_argument("--replicas", type=int, default=1, help="engine replicas (a fixed count)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves")
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="Ray GPUs each replica reserves")
    ray.add_argument("--max-ongoing-requests", type=int,
                     help="requests one replica runs at once (default: --max-batch-size); beyond it an adapter's "
                          "requests spill to another replica")
    ray.add_argument("--max-queued-requests", type=int,
                     help="requests waiting for a replica before 429 (default: --max-concurrent-requests)")
    ray.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001 or auto), deploy, and exit; "
                                       "without it a local cluster runs until SIGTERM/Ctrl-C")
    ray.add_argument("--num-cpus", type=int, help="local cluster: CPUs Ray may schedule on (default: all)")
    ray.add_argument("--metrics-export-port", type=int, help="local cluster: Ray's Prometheus port (Serve metrics)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skipped = ("command", "config", "log_level", "log_format", *RAY_FLAGS)
    overrides = {k: v for k, v in vars(args).items() if k not in skipped}
    if overrides.get("api_keys"):
        overrides["api_keys"] = tuple(overrides["api_keys"])
    try:
        settings = load_settings(args.config, overrides)
        check_logging_choices(args.log_level, args.log_format)  # argparse leaves env-var defaults unchecked
    except ConfigError as exc:
        print(f"loraserve: invalid configuration: {exc}", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    configure_logging(args.log_level, args.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "serve-ray":
        return serve_ray(args, settings)
    try:  # what can be checked in seconds comes before the slow part, the cheapest first
        sock = bind_socket(settings.http.host, settings.http.port)
    except StartupError as exc:
        return report_start_failure(exc)
    try:
        preflight(settings.model)
    except Exception as exc:
        sock.close()
        return report_start_failure(exc)
    return serve(settings, sock, args.log_level)


def serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from server.scaleout.cli import run_serve_ray
    except ImportError as exc:
        print(f"loraserve: serve-ray needs Ray Serve ({exc}): pip install 'loraserve[ray]'", file=sys.stderr)
        return ExitCode.CANNOT_START
    return run_serve_ray(args, settings)


def check_logging_choices(level: str, fmt: str) -> None:
    if level not in _LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(_LOG_LEVELS)}; got {level!r}")
    if fmt not in _LOG_FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(_LOG_FORMATS)}; got {fmt!r}")


def bind_socket(host: str, port: int) -> socket.socket:
    """Take the port now, so a busy one fails the start at once instead of after the model has
    loaded; uvicorn listens on this socket later (until then connections are refused, not queued)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts skip TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(bind_failure_message(host, port, exc)) from None
    return sock


def bind_failure_message(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another server?): stop it or choose another --port"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port}: ports below 1024 need privileges; choose another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: no such address on this machine; use --host 127.0.0.1 or 0.0.0.0"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port"


def preflight(config: ModelConfig) -> None:
    """The model path, device and dtype checks that need no weights: the path before torch is
    imported (a second or more), device and dtype after."""
    if config.model != "default":
        local_model_dir(config.model)  # a hub id passes; it is fetched while /health says "resolving"
    from server.model.loader import pick_device, pick_dtype

    pick_dtype(config.dtype, pick_device(config.device))


def serve(settings: Settings, sock: socket.socket, log_level: str) -> int:
    """Serve until SIGTERM, or until the model fails to load: then stop and report why."""
    import uvicorn

    from server.api.app import create_app
    from server.engine.builder import build_serving_engine

    failures: list[Exception] = []

    def stop_serving(exc: Exception) -> None:  # on the model-loading thread
        failures.append(exc)
        server.should_exit = True  # uvicorn checks it every 0.1 s, then shuts down as on SIGTERM

    app = create_app(settings, build_serving_engine, on_load_failure=stop_serving)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.http.host, port=settings.http.port, log_level=log_level,
        timeout_graceful_shutdown=settings.http.shutdown_grace_s,
        log_config=None))  # uvicorn's loggers go through ours: one format, with request ids
    warn_if_open(settings.http)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler it found at
    # start; a no-op one here lets a graceful shutdown end with exit code 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]  # uvicorn does not log this for a socket it was handed
    log.info("listening on http://%s:%d (/health answers 503 until the model is loaded)",
             f"[{host}]" if ":" in host else host, port)
    server.run(sockets=[sock])
    if failures:
        return report_start_failure(failures[0])
    return ExitCode.OK if server.started else ExitCode.START_CRASHED  # uvicorn logged why it did not start


def warn_if_open(http: HttpConfig) -> None:
    if not http.api_keys:
        log.warning("no API keys configured: anyone who can reach %s:%d can use this server%s", http.host, http.port,
                    "" if http.host in ("127.0.0.1", "localhost", "::1") else
                    " (it is NOT bound to loopback: set --api-key or LORASERVE_API_KEYS)")


def report_start_failure(exc: Exception) -> int:
    """One line on stderr saying what failed and what to do; a traceback only for a bug, or with
    --log-level debug."""
    if isinstance(exc, StartupError):
        log.debug("start-up failed", exc_info=exc)
        print(f"loraserve: cannot start: {one_line(exc, limit=2000)}", file=sys.stderr)  # never cut the advice
        return ExitCode.CANNOT_START
    log.error("unexpected error while starting", exc_info=exc)
    print(f"loraserve: unexpected error while starting ({type(exc).__name__}: {one_line(exc)}); "
          "the traceback is in the log above", file=sys.stderr)
    return ExitCode.START_CRASHED


if __name__ == "__main__":
    sys.exit(main())
