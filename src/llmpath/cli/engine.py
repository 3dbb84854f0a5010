"""`llmpath engine`: the embedded SGLang-compatible engine."""

from __future__ import annotations

from pathlib import Path

import typer

from llmpath.cli.log_level import LogLevel

app = typer.Typer(help="The embedded SGLang-compatible engine.", no_args_is_help=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(30000, help="Port to listen on."),
    preset: str = typer.Option("tiny", help="Model shape with fixed-seed random weights: tiny, small or llama-8b."),
    model: Path | None = typer.Option(None, "--model", help="A local Llama-family safetensors checkpoint directory."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str | None = typer.Option(
        None, help="float32, bfloat16 or float16 (default: float32 on CPU, bf16 on CUDA)."
    ),
    max_running: int = typer.Option(16, "--max-running", help="Requests decoded together (continuous batching)."),
    max_queued: int = typer.Option(256, "--max-queued-requests", help="Waiting-queue bound; beyond it: 503."),
    kv_tokens: int | None = typer.Option(None, "--kv-tokens", help="KV pool size in token slots."),
    context_length: int | None = typer.Option(None, "--context-length", help="Override the context length."),
    max_prefill_tokens: int = typer.Option(16384, "--max-prefill-tokens", help="Tokens per prefill batch."),
    chunked_prefill_size: int | None = typer.Option(
        None,
        "--chunked-prefill-size",
        help="Prompt tokens per prefill forward (default as SGLang: 2048 on CPU, by GPU memory on CUDA; -1: whole "
        "prompts).",
    ),
    enable_mixed_chunk: bool = typer.Option(
        False, "--enable-mixed-chunk", help="Running requests decode a token in each prefill chunk's forward."
    ),
    schedule_policy: str = typer.Option("fcfs", "--schedule-policy", help="fcfs or lpm (longest prefix match)."),
    disable_radix_cache: bool = typer.Option(False, "--disable-radix-cache", help="Turn prefix reuse off."),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (engines sharing cores: 1)."),
    seed: int = typer.Option(0, "--random-seed", "--seed", help="Seed of the weights and of sampling."),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="Model name in APIs/metrics."),
    enable_metrics: bool = typer.Option(
        True, "--enable-metrics/--disable-metrics", help="/metrics and meta_info timing keys (SGLang --enable-metrics)."
    ),
    enable_cache_report: bool = typer.Option(
        True, "--enable-cache-report/--disable-cache-report", help="usage.prompt_tokens_details.cached_tokens."
    ),
    incremental_streaming_output: bool = typer.Option(
        False, "--incremental-streaming-output", help="/generate streams deltas instead of cumulative text."
    ),
    include_usage: bool = typer.Option(
        False, "--stream-response-default-include-usage", help="OpenAI streams end with a usage chunk by default."
    ),
    enable_fault_injection: bool = typer.Option(
        False, "--enable-fault-injection", help="Allow POST /debug/fault (tests and demos only)."
    ),
    otlp_traces_endpoint: str | None = typer.Option(
        None, "--otlp-traces-endpoint", help="OTLP/HTTP endpoint for spans (default: OTEL_EXPORTER_OTLP_* env)."
    ),
    bucket_ttft: str | None = typer.Option(
        None, "--bucket-time-to-first-token", help="TTFT buckets, SGLang's rules: 'default', 'tse M B N', 'custom V …'."
    ),
    log_level: LogLevel = typer.Option(LogLevel.info, "--log-level", case_sensitive=False, help="Log level."),
) -> None:
    """Serve SGLang's HTTP API (/generate, /v1/chat/completions, /metrics, …) from an embedded engine."""
    from llmpath.backends.engine.args import EngineArgs
    from llmpath.backends.engine.metrics import DEFAULT_BUCKETS, parse_buckets
    from llmpath.gateway.config import host_problem

    try:
        if not 0 <= port <= 65535:
            raise ValueError(f"--port must be 0-65535, got {port}")
        if (problem := host_problem(host)) is not None:
            raise ValueError(f"--host: {problem}")
        buckets = {}
        if bucket_ttft:
            name = "sglang:time_to_first_token_seconds"
            buckets[name] = parse_buckets(bucket_ttft.split(), DEFAULT_BUCKETS[name])
        args = EngineArgs(
            preset=preset, model_path=model, device=device, dtype=dtype, seed=seed, served_model_name=served_model_name,
            context_length=context_length, kv_tokens=kv_tokens, max_running=max_running, max_queued=max_queued,
            max_prefill_tokens=max_prefill_tokens, chunked_prefill_size=chunked_prefill_size,
            enable_mixed_chunk=enable_mixed_chunk, schedule_policy=schedule_policy,
            disable_radix_cache=disable_radix_cache, threads=threads, enable_metrics=enable_metrics,
            enable_cache_report=enable_cache_report, enable_fault_injection=enable_fault_injection,
            incremental_streaming_output=incremental_streaming_output,
            stream_response_default_include_usage=include_usage, otlp_traces_endpoint=otlp_traces_endpoint,
            buckets=buckets,
        )  # fmt: skip
        args.validate()
    except ValueError as exc:
        typer.echo(f"llmpath engine serve: {exc}", err=True)
        raise typer.Exit(2) from None
    from llmpath.backends.engine.serve import EngineSetupError
    from llmpath.backends.engine.serve import serve as run  # loads torch

    try:
        run(args, host=host, port=port, log_level=log_level)
    except EngineSetupError as exc:
        typer.echo(f"llmpath engine serve: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def presets() -> None:
    """List the model presets with their shapes and parameter counts."""
    from llmpath.backends.engine.presets import PRESETS

    for name, cfg in PRESETS.items():
        typer.echo(
            f"{name:9} {cfg.num_parameters() / 1e6:8.1f}M params  hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
            f"layers, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV, vocab {cfg.vocab_size}, "
            f"context {cfg.max_position_embeddings}"
        )
