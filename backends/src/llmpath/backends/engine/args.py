"""The engine's server arguments and their checks, importable without torch (which takes seconds to load):
``llmpath engine serve`` refuses a bad flag at once, and ``llmpath engine presets`` never loads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from llmpath.backends.engine.presets import GPU_ONLY_PRESETS, preset
from llmpath.backends.engine.tracing import otlp_traces_url

#: The ``--dtype`` names (torch's dtype names).
DTYPES = ("float32", "bfloat16", "float16")


#: ``--chunked-prefill-size`` when not given on CPU: what SGLang picks on GPUs with little memory.
DEFAULT_CHUNKED_PREFILL_SIZE = 2048
#: SGLang's automatic ``--chunked-prefill-size`` on a GPU: (below this many GiB of GPU memory, chunk size), in order;
#: above the last, 16384 (B200, MI300).
_GPU_CHUNKED_PREFILL_SIZES = ((35, 2048), (60, 4096), (160, 8192))


def default_chunked_prefill_size(gpu_memory_gib: float | None) -> int:
    """``--chunked-prefill-size`` when not given: as SGLang, it grows with GPU memory (2048 under 35 GiB, 4096
    under 60, 8192 under 160 GiB: A100, H100, H200; 16384 above); on CPU (``None``) 2048."""
    if gpu_memory_gib is None:
        return DEFAULT_CHUNKED_PREFILL_SIZE
    return next((size for below, size in _GPU_CHUNKED_PREFILL_SIZES if gpu_memory_gib < below), 16384)


@dataclass(slots=True)
class EngineArgs:
    """Server arguments (SGLang's names where SGLang has the same knob)."""

    preset: str = "tiny"
    model_path: Path | None = None
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    served_model_name: str | None = None
    context_length: int | None = None
    kv_tokens: int | None = None
    max_running: int = 16
    max_queued: int = 256
    max_prefill_tokens: int = 16384
    #: ``None``: :func:`default_chunked_prefill_size` of the device; ``-1``: chunked prefill off.
    chunked_prefill_size: int | None = None
    enable_mixed_chunk: bool = False
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    threads: int | None = None
    enable_metrics: bool = True
    enable_cache_report: bool = True
    enable_fault_injection: bool = False
    incremental_streaming_output: bool = False
    stream_response_default_include_usage: bool = False
    otlp_traces_endpoint: str | None = None
    buckets: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def chunk_size(self) -> int | None:
        """Prompt tokens per prefill forward (``None``: chunked prefill off)."""
        if self.chunked_prefill_size is None:
            gib = None
            if self.device == "cuda":
                import torch

                gib = torch.cuda.get_device_properties(0).total_memory / 2**30
            return default_chunked_prefill_size(gib)
        return None if self.chunked_prefill_size == -1 else self.chunked_prefill_size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and the reason."""
        if self.model_path is None:
            preset(self.preset)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if self.model_path is None and self.preset in GPU_ONLY_PRESETS and self.device != "cuda":
            raise ValueError(
                f"--preset {self.preset} is GPU only (the Llama-3-8B shape: tens of GB of weights and KV cache); "
                "use --device cuda, or --preset tiny or small on CPU"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"--schedule-policy must be fcfs or lpm, got {self.schedule_policy!r}")
        for name in ("max_running", "max_queued", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise ValueError("--chunked-prefill-size must be -1 (off) or at least 1")
        if self.kv_tokens is not None and self.kv_tokens < 16:
            raise ValueError("--kv-tokens must be at least 16")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError("--context-length must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be at least 1")
        if self.model_path is not None and not self.model_path.is_dir():
            raise ValueError(f"--model {self.model_path}: not a directory")
        endpoint = self.otlp_traces_endpoint
        if endpoint is not None and (problem := otlp_endpoint_problem(endpoint)) is not None:
            raise ValueError(f"--otlp-traces-endpoint {endpoint!r}: {problem}")


def otlp_endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not an OTLP/HTTP endpoint the engine can export to (``http(s)://host[:port][/path]``, or
    SGLang's ``host:port``); ``None`` if it is."""
    if not endpoint or any(c.isspace() for c in endpoint):
        return "give http(s)://host:port[/v1/traces] or host:port, without spaces"
    if "://" in endpoint and not endpoint.startswith(("http://", "https://")):
        return "the engine exports OTLP over HTTP: use http:// or https:// (or host:port)"
    try:
        parts = urlsplit(otlp_traces_url(endpoint))  # the URL the exporter will use
        parts.port  # noqa: B018  # raises on a port that is not a number
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if not parts.hostname:
        return "no host"
    return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
