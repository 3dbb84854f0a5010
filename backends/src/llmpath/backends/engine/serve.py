"""Run the engine's HTTP server (what ``llmpath engine serve`` calls)."""

from __future__ import annotations

import gc
import logging
import sys

from llmpath.backends.engine.runtime import Engine, EngineArgs

log = logging.getLogger("llmpath.engine")


class EngineSetupError(ValueError):
    """The engine cannot be built from these arguments (an unsupported checkpoint, a context beyond its window)."""


def serve(args: EngineArgs, host: str = "127.0.0.1", port: int = 30000, log_level: str = "info") -> None:
    """Build the engine, start its scheduler and serve HTTP until interrupted (SIGINT/SIGTERM)."""
    import prometheus_client
    import uvicorn

    from llmpath.backends.engine.server import create_app
    from llmpath.backends.engine.tracing import shutdown_tracing

    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # SGLang serves its metrics in prometheus-client's multiprocess mode, which has no ``*_created`` series: neither
    # does the engine (its process only; set before the metrics exist).
    prometheus_client.disable_created_metrics()
    try:
        engine = Engine(args)
    except ValueError as exc:  # the checkpoint or a setting the engine cannot run: said in one line, no traceback
        raise EngineSetupError(str(exc)) from None

    def shutdown() -> None:
        engine.stop()
        shutdown_tracing()  # flush the spans still batched

    try:
        engine.start()
        app = create_app(engine, on_shutdown=shutdown)
        # torch, the model and the server live as long as the process: without this every full collection
        # rescans them, a stop-the-world pause of ~100 ms on a busy CPU engine that lands on in-flight requests.
        gc.collect()
        gc.freeze()
        cfg = engine.config
        log.info(
            "llmpath engine %s: %s (%.1fM params, %s, %s), KV pool %d tokens, max running %d, on http://%s:%d",
            engine.model_name,
            "checkpoint" if args.model_path else f"preset {args.preset}",
            cfg.num_parameters() / 1e6,
            args.device,
            str(engine.dtype).removeprefix("torch."),
            engine.pool.size,
            args.max_running,
            host,
            port,
        )
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        shutdown()  # when uvicorn returns normally (shutdown is idempotent)
