"""Command line: `loraserve serve [...]` (also `python -m server serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from server.config import ConfigError, load_settings
from server.logs import configure as configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help='"default", a local HF model directory, or a hub id')
    serve.add_argument("--device", choices=["cpu", "cuda", "auto"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--threads", type=int, help="torch CPU threads (0 = all cores)")
    serve.add_argument("--cuda-graph-max-batch-size", type=int, help="CUDA: graph decode steps up to this size")
    serve.add_argument("--quantize", choices=["none", "int8"], help="CPU: int8 weight copies for small decode steps")
    for name in ("max_input_length", "max_total_tokens", "max_batch_total_tokens", "max_batch_prefill_tokens",
                 "max_batch_size", "max_concurrent_requests", "max_stop_sequences", "max_stop_sequence_length",
                 "max_best_of", "max_active_adapters", "max_adapter_memory_mb", "max_cpu_adapters", "max_queue_wait_s",
                 "adapter_download_timeout_s"):
        serve.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    serve.add_argument("--api-key", dest="api_keys", action="append",
                       help="accept this bearer token (repeat for several; default: no auth)")
    serve.add_argument("--log-level", default=os.environ.get("LORASERVE_LOG_LEVEL", "info"))
    serve.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("LORASERVE_LOG_FORMAT", "text"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level", "log_format")}
    if overrides.get("api_keys"):
        overrides["api_keys"] = tuple(overrides["api_keys"])
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"loraserve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import uvicorn

    from server.api.app import create_app
    from server.engine.builder import build_engine

    app = create_app(settings, build_engine)
    if not settings.http.api_keys:
        logging.getLogger("server").warning(
            "no API keys configured: anyone who can reach %s:%d can use this server%s", settings.http.host,
            settings.http.port, "" if settings.http.host in ("127.0.0.1", "localhost", "::1") else
            " (it is NOT bound to loopback: set --api-key or LORASERVE_API_KEYS)")
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler it found at
    # start; a no-op one here lets a graceful shutdown end with exit code 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=settings.http.host, port=settings.http.port, log_level=args.log_level.lower(),
                timeout_graceful_shutdown=settings.http.shutdown_grace_s,
                log_config=None)  # uvicorn's loggers go through ours: one format, with request ids
    return 0


if __name__ == "__main__":
    sys.exit(main())
