"""The engine: model + tokenizer + KV pool + radix cache + scheduler behind one async ``submit`` call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmpath.backends.engine.args import DTYPES, EngineArgs
from llmpath.backends.engine.faults import FaultInjector
from llmpath.backends.engine.kv_pool import TokenSlotPool
from llmpath.backends.engine.metrics import EngineMetrics
from llmpath.backends.engine.model import LlamaModel, load_safetensors
from llmpath.backends.engine.presets import ModelConfig, config_from_hf, preset, with_context
from llmpath.backends.engine.radix_cache import RadixCache
from llmpath.backends.engine.sampling import InvalidSamplingParams, Sampler, SamplingParams
from llmpath.backends.engine.scheduler import EngineRequest, Output, Scheduler, SchedulerConfig
from llmpath.backends.engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from llmpath.backends.engine.tracing import setup_tracer

#: The SGLang release whose protocol the engine speaks, marked as llmpath's (``/server_info``, ``/v1/loads``).
VERSION = "0.5.23-llmpath"
#: Default KV pool size (token slots) per preset; a checkpoint gets 8 × its context length.
DEFAULT_KV_TOKENS = {"tiny": 65536, "small": 32768, "llama-8b": 131072}
_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def _build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """The model allocated directly on ``device`` in ``dtype`` (an 8B model never passes through host memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return LlamaModel(config)
    finally:
        torch.set_default_dtype(previous)


def _export_byte_tokenizer(tokenizer: ByteTokenizer) -> Path:
    """The byte tokenizer's Hugging Face files in a per-user cache directory (written once, atomically, shared by
    every engine; nothing to clean up)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmpath" / "byte-tokenizer-v1"
    if (cache / "tokenizer_config.json").exists():
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".byte-tokenizer-", dir=cache.parent))
        tokenizer.write_hf_files(staging)
        staging.chmod(0o755)
        try:
            staging.rename(cache)
        except OSError:  # another engine won the race
            shutil.rmtree(staging, ignore_errors=True)
        return cache
    except OSError:  # read-only home: a private temporary copy
        return tokenizer.write_hf_files(Path(tempfile.mkdtemp(prefix="llmpath-tokenizer-")))


class RequestError(ValueError):
    """A request the engine refuses (HTTP 400 with this message)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestStream:
    """The outputs of one submitted request. Closing it before the last output aborts the request (its KV slots
    return to the pool), which is what a client disconnect does."""

    def __init__(self, rid: str, outputs: asyncio.Queue[Output], scheduler: Scheduler) -> None:
        self.rid = rid
        self._outputs = outputs
        self._scheduler = scheduler
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Output:
        if self.finished:
            raise StopAsyncIteration
        if not self._outputs.empty():
            await asyncio.sleep(0)  # a ready item would not suspend: let other requests' tasks run
        out = await self._outputs.get()
        self.finished = out.finished
        return out

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self._scheduler.abort(self.rid)


class Engine:
    """Builds everything from :class:`EngineArgs` and serves requests; call :meth:`start` before use."""

    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        self.dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
        cfg = config_from_hf(args.model_path) if args.model_path else preset(args.preset)
        self.config: ModelConfig = with_context(cfg, args.context_length)
        self.model_name = args.served_model_name or (str(args.model_path) if args.model_path else self.config.name)
        self.tokenizer: Tokenizer = load_tokenizer(args.model_path, self.config.vocab_size, self.config.eos_token_ids)
        #: Where the tokenizer files live: the checkpoint, or the byte tokenizer exported to a cache directory.
        self.tokenizer_dir: Path | None = args.model_path
        if isinstance(self.tokenizer, ByteTokenizer):
            self.tokenizer_dir = _export_byte_tokenizer(self.tokenizer)
        started = time.monotonic()
        self.model = _build_model(self.config, self.device, self.dtype)
        if args.model_path:
            load_safetensors(self.model, args.model_path)
        else:
            self.model.init_random(args.seed)
        self.model.prepare(self.device, self.dtype)
        self.model.eval()
        self.load_seconds = time.monotonic() - started
        kv_tokens = args.kv_tokens or (
            DEFAULT_KV_TOKENS[args.preset] if not args.model_path else 8 * self.config.max_position_embeddings
        )
        c = self.config
        self.pool = TokenSlotPool(
            kv_tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype=self.dtype, device=self.device
        )
        self.tree = None if args.disable_radix_cache else RadixCache(self.pool.free, self.device)
        self.metrics = EngineMetrics(self.model_name, args.buckets) if args.enable_metrics else None
        self.faults = FaultInjector(seed=args.seed)
        self.tracer = setup_tracer("llmpath-engine", args.otlp_traces_endpoint)
        self.scheduler = Scheduler(
            self.model,
            self.pool,
            self.tree,
            self.tokenizer,
            Sampler(self.tokenizer.sampleable_ids, c.vocab_size, args.seed),
            SchedulerConfig(
                max_running=args.max_running,
                max_queued=args.max_queued,
                max_prefill_tokens=args.max_prefill_tokens,
                chunked_prefill_size=args.chunk_size,
                enable_mixed_chunk=args.enable_mixed_chunk,
                schedule_policy=args.schedule_policy,
                context_length=c.max_position_embeddings,
                model_name=self.model_name,
                time_stats=args.enable_metrics,
            ),
            metrics=self.metrics,
            faults=self.faults,
            tracer=self.tracer,
        )
        self.started_at = time.time()

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    # ----------------------------------------------------------------- request preparation

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    def check_input(self, input_ids: Sequence[int], params: SamplingParams) -> int:
        """Validate lengths and ids; return the effective ``max_new_tokens`` (SGLang's messages)."""
        n, ctx = len(input_ids), self.context_length
        if n == 0:
            raise RequestError("The input is empty.", "text")
        bad = next((t for t in input_ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise RequestError(f"input_ids: token id {bad} is outside the vocabulary (size {self.config.vocab_size}).")
        if n >= ctx:
            raise RequestError(f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens).")
        max_new = params.max_new_tokens if params.max_new_tokens is not None else ctx - n
        if n + max_new > ctx:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a "
                f"total of {n + max_new} tokens: {n} tokens from the input messages and {max_new} tokens for the "
                "completion. Please reduce the number of tokens in the input messages or the completion to fit "
                "within the limit.",
                "max_tokens",
            )
        if n + max_new > self.pool.size:
            raise RequestError(
                f"The request needs {n + max_new} KV slots but the engine's KV pool has {self.pool.size} "
                "(raise --kv-tokens or lower max_new_tokens).",
                "max_tokens",
            )
        params.verify(self.config.vocab_size)
        if params.min_new_tokens and self._stops_cover_every_token(params.stop_token_ids):
            raise InvalidSamplingParams(
                "min_new_tokens is above 0, but stop_token_ids and the EOS tokens are every token this engine "
                "samples: none is left to generate before it."
            )
        return max_new

    def _stops_cover_every_token(self, stop_token_ids: Sequence[int]) -> bool:
        """Whether masking EOS and ``stop_token_ids`` (as before ``min_new_tokens``) leaves nothing to sample."""
        sampleable = self.tokenizer.sampleable_ids
        eos = self.tokenizer.eos_token_ids
        if len(stop_token_ids) + len(eos) < len(sampleable):
            return False
        return set(sampleable) <= {*eos, *stop_token_ids}

    # ----------------------------------------------------------------- generation

    def submit(
        self,
        input_ids: list[int],
        params: SamplingParams,
        *,
        rid: str | None = None,
        namespace: str = "",
        stream: bool = True,
        trace_parent: Any = None,
        received_ts: float | None = None,
        received_mono: float | None = None,
        log_metrics: bool = True,
    ) -> RequestStream:
        """Validate and queue one request; raises :class:`RequestError`, ``InvalidSamplingParams``, ``QueueFull``
        or ``DuplicateRequestId`` before anything runs. Iterate the result for its outputs."""
        max_new = self.check_input(input_ids, params)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def emit(out: Output) -> None:
            # An abort's last output may come after the server stopped, and the loop may close at any moment.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        req = EngineRequest(
            rid=rid or uuid.uuid4().hex,
            input_ids=list(input_ids),
            params=params,
            max_new_tokens=max_new,
            namespace=namespace,
            stream=stream,
            emit=emit,
            trace_parent=trace_parent,
            log_metrics=log_metrics,
        )
        if received_ts is not None:
            req.received_ts = received_ts
        if received_mono is not None:
            req.received_mono = received_mono
        if params.sampling_seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(params.sampling_seed)
        req.decoder = self.tokenizer.decoder(params.skip_special_tokens)
        self.scheduler.submit(req)
        return RequestStream(req.rid, outputs, self.scheduler)

    def model_info(self) -> dict[str, Any]:
        """``/model_info`` in SGLang's shape (what sglang-router reads)."""
        cfg = self.config
        return {
            # A preset's "model path" is its exported tokenizer directory: tools that load a worker's tokenizer
            # from model_path (sglang-router does) find it locally instead of asking a model hub.
            "model_path": str(self.args.model_path or self.tokenizer_dir),
            "tokenizer_path": str(self.tokenizer_dir) if self.tokenizer_dir else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "served_model_name": self.model_name,
            "max_context_length": cfg.max_position_embeddings,
            "max_req_input_len": cfg.max_position_embeddings - 1,
            "vocab_size": cfg.vocab_size,
            "eos_token_ids": list(self.tokenizer.eos_token_ids),
            "bos_token_id": self.tokenizer.bos_token_id,
            "pad_token_id": None,
            "supports_vision": False,
        }

    def memory_bytes(self) -> tuple[int, int]:
        """Bytes of the model's weights and of the KV pool's buffers."""
        weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
        kv = sum(t.numel() * t.element_size() for t in (*self.pool.k_buffers, *self.pool.v_buffers))
        return weights, kv

    def accelerator(self) -> str | None:
        """The GPU's name (``None`` on CPU), as ``/v1/loads`` reports it."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None

    def server_info(self) -> dict[str, Any]:
        """``/server_info``: server arguments, runtime state and version, as SGLang reports them."""
        a = self.args
        loads = self.scheduler.loads()
        return {
            "model_path": self.model_info()["model_path"],
            "served_model_name": self.model_name,
            "preset": None if a.model_path else a.preset,
            "device": a.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "context_length": self.context_length,
            "max_total_num_tokens": self.pool.size,
            "max_running_requests": a.max_running,
            "max_queued_requests": a.max_queued,
            "max_prefill_tokens": a.max_prefill_tokens,
            "chunked_prefill_size": a.chunk_size or -1,
            "enable_mixed_chunk": a.enable_mixed_chunk,
            "schedule_policy": a.schedule_policy,
            "disable_radix_cache": a.disable_radix_cache,
            "enable_metrics": a.enable_metrics,
            "enable_cache_report": a.enable_cache_report,
            "enable_fault_injection": a.enable_fault_injection,
            "incremental_streaming_output": a.incremental_streaming_output,
            "page_size": 1,
            "tp_size": 1,
            "dp_size": 1,
            "random_seed": a.seed,
            "num_parameters": self.config.num_parameters(),
            "internal_states": [
                {
                    **loads,
                    "last_gen_throughput": loads["gen_throughput"],
                    "radix_cache_nodes": self.tree.node_count() if self.tree else 0,
                    "num_forward_passes": self.scheduler.forward_count,
                }
            ],
            "version": VERSION,
            "engine": "llmpath",
        }
