"""The scheduler: a bounded waiting queue, radix-cache-aware admission, and continuous batching.

It runs in its own thread (like SGLang's scheduler process). Each iteration either admits waiting requests and
prefills them as one batch (only the uncached suffix of each prompt is computed), or runs one decode step for every
running request at once. Requests join and leave the running batch between steps.

Chunked prefill (SGLang's ``--chunked-prefill-size``): a prefill batch computes at most that many prompt tokens; a
longer prompt is computed over several iterations, one chunk each, and after each chunk its KV so far goes into the
radix cache (other requests can share it at once). As in SGLang, the chunks run back to back ahead of decode, so
running requests wait for the whole prompt, unless ``enable_mixed_chunk`` (``--enable-mixed-chunk``) lets every
running request decode one token in each chunk's forward pass.

Memory: a request is admitted only when the pool (free + evictable slots) can hold its uncached prompt and its
``max_new_tokens``; that reservation means decode never runs out of slots, so no request is ever retracted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from llmpath.backends.engine.faults import FaultInjector
from llmpath.backends.engine.kv_pool import TokenSlotPool
from llmpath.backends.engine.metrics import EngineMetrics
from llmpath.backends.engine.model import ForwardBatch, LlamaModel, SeqInput
from llmpath.backends.engine.radix_cache import RadixCache, TreeNode
from llmpath.backends.engine.sampling import Sampler, SamplingParams
from llmpath.backends.engine.tokenizer import IncrementalDecoder, Tokenizer
from llmpath.backends.engine.tracing import RequestTrace, emit_request_spans, finish_attributes

log = logging.getLogger("llmpath.engine")

#: Longest-prefix-match ordering falls back to FCFS above this many waiting requests (SGLang's default).
LPM_MAX_QUEUE = 128


class QueueFull(RuntimeError):
    """The waiting queue is at ``--max-queued-requests`` (HTTP 503 with ``Retry-After``)."""


class DuplicateRequestId(ValueError):
    """A request with the same ``rid`` is in flight (HTTP 400, as SGLang)."""


@dataclass(slots=True)
class Output:
    """One emission to the HTTP layer: new tokens and text, and ``meta_info`` as SGLang reports it."""

    new_ids: list[int]
    new_text: str
    text: str
    meta: dict[str, Any]
    finished: bool
    #: Set on engine-side failures (HTTP status, message).
    error: tuple[int, str] | None = None


@dataclass(eq=False)
class EngineRequest:
    """A request as the scheduler tracks it. ``emit`` must be thread-safe (the HTTP layer hands one in)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    namespace: str
    stream: bool
    emit: Callable[[Output], None]
    received_ts: float = field(default_factory=time.time)
    received_mono: float = field(default_factory=time.monotonic)
    trace_parent: Any = None
    #: False for health checks: not counted in the request metrics (SGLang's ``log_metrics``).
    log_metrics: bool = True
    generator: torch.Generator | None = None
    # state
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    decoder: IncrementalDecoder | None = None
    slots: torch.Tensor | None = None
    tree_len: int = 0
    last_node: TreeNode | None = None
    reserved: int = 0
    #: Tokens of ``fill_ids`` whose KV is computed (the cached prefix, then chunk by chunk); ``len(slots)`` once the
    #: prompt is prefilled.
    computed: int = 0
    cached_tokens: int | None = None
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    # times (epoch seconds for the meta_info keys, monotonic for durations)
    dispatch_ts: float = 0.0
    queue_enter_mono: float = 0.0
    queue_time: float = 0.0
    forward_entry_ts: float | None = None
    forward_entry_mono: float | None = None
    prefill_finished_ts: float | None = None
    prefill_finished_mono: float | None = None
    first_token_mono: float | None = None
    finished_ts: float | None = None
    finished_mono: float | None = None

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids


@dataclass(slots=True)
class SchedulerConfig:
    max_running: int = 16
    max_queued: int = 256
    max_prefill_tokens: int = 16384
    #: Prompt tokens computed per prefill forward (``None``: whole prompts).
    chunked_prefill_size: int | None = None
    #: Running requests decode one token in each chunk's forward (SGLang's ``--enable-mixed-chunk``).
    enable_mixed_chunk: bool = False
    schedule_policy: str = "fcfs"  # or "lpm"
    context_length: int = 4096
    model_name: str = "llmpath"
    #: Whether meta_info carries SGLang's --enable-metrics timing keys.
    time_stats: bool = True


class Scheduler:
    """Owns the model, the KV pool and the radix cache; everything below the public API runs on its thread."""

    def __init__(
        self,
        model: LlamaModel,
        pool: TokenSlotPool,
        tree: RadixCache | None,
        tokenizer: Tokenizer,
        sampler: Sampler,
        config: SchedulerConfig,
        *,
        metrics: EngineMetrics | None = None,
        faults: FaultInjector | None = None,
        tracer: Any = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.tree = tree
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.config = config
        self.metrics = metrics
        self.faults = faults or FaultInjector()
        self.tracer = tracer
        self.device = pool.device
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        #: The request whose prompt is being prefilled chunk by chunk (at most one, as in SGLang).
        self.chunked: EngineRequest | None = None
        #: The requests of the prefill batch being run: out of ``waiting``, not yet ``running``.
        self.prefilling: list[EngineRequest] = []
        self.reserved = 0
        self.forward_count = 0
        self.last_error: str | None = None
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._queued = 0
        #: Prompt tokens of the queued requests (SGLang's waiting queue ``seqlen``s), under ``_lock`` with ``_queued``.
        self._queued_tokens = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_evicted = 0
        self._last_hit_rate = 0.0
        self._gen_throughput = 0.0

    # ----------------------------------------------------------------- API (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmpath-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, req: EngineRequest) -> None:
        """Queue a request; raises :class:`QueueFull` or :class:`DuplicateRequestId`."""
        with self._lock:
            if req.rid in self._active:
                raise DuplicateRequestId(f"Duplicate request ID detected: {req.rid}")
            if self._queued >= self.config.max_queued:
                raise QueueFull(f"The waiting queue is full ({self.config.max_queued} requests).")
            self._active.add(req.rid)
            self._queued += 1
            self._queued_tokens += len(req.fill_ids)
        req.dispatch_ts = time.time()
        req.queue_enter_mono = time.monotonic()
        self._inbox.put(("req", req))

    def abort(self, rid: str | None, *, requested: bool = False) -> None:
        """Abort a queued or running request; its KV slots go back to the pool and its client gets a last output
        with an ``abort`` finish reason. ``requested``: ``POST /abort_request`` (SGLang's messages and matching:
        a known ``rid`` aborts every request whose rid starts with it; ``None`` aborts all) rather than a client
        that went away (its own rid only)."""
        self._inbox.put(("abort", (rid, requested)))

    def flush_cache(self) -> Future[bool]:
        """Drop the radix cache; resolves to False while requests run or wait (as SGLang)."""
        fut: Future[bool] = Future()
        self._inbox.put(("flush", fut))
        return fut

    def loads(self) -> dict[str, Any]:
        """One DP rank's core load figures, as SGLang's ``LoadSnapshot`` (``/v1/loads``): ``num_total_tokens`` is the
        KV in use plus the queued prompts (SGLang's load scalar), ``max_total_num_tokens`` the pool's capacity.
        ``num_waiting_uncached_tokens`` counts queued prompts whole (their prefixes are matched when they are
        scheduled) plus what the chunked prefill has left."""
        total = self.pool.size
        evictable = self.tree.evictable_size if self.tree else 0
        used = total - self.pool.available - evictable
        with self._lock:
            waiting, queued_tokens = self._queued, self._queued_tokens
        chunked = self.chunked
        chunk_left = max(0, len(chunked.fill_ids) - chunked.computed) if chunked is not None else 0
        running = len(self.running)
        return {
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_waiting_uncached_tokens": queued_tokens + chunk_left,
            "num_used_tokens": used,
            "num_total_tokens": used + queued_tokens,
            "max_total_num_tokens": total,
            "max_running_requests": self.config.max_running,
            "token_usage": round(used / total, 4),
            "gen_throughput": round(self._gen_throughput, 2),
            "cache_hit_rate": round(self._last_hit_rate, 4),
            "utilization": round(running / self.config.max_running, 4),
        }

    # ----------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain(block=not self.waiting and not self.running and self.chunked is None)
                if self._stop.is_set():
                    break
                if (self.waiting or self.chunked is not None) and self._schedule_prefill():
                    pass
                elif self.running:
                    self._decode_step()
                elif self.waiting:
                    self._drain(block=True, timeout=0.005)  # delayed by a fault or memory: wait briefly
                self._publish_gauges()
            except Exception as exc:  # a bug must not hang the server silently: fail what is in flight
                log.exception("scheduler step failed")
                self.last_error = repr(exc)
                self._fail_all(f"internal engine error: {exc!r}")

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "req":
                self.waiting.append(payload)
            elif kind == "abort":
                self._abort(*payload)
            elif kind == "flush":
                payload.set_result(self._flush())
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _flush(self) -> bool:
        if self.waiting or self.running or self.chunked is not None:
            return False
        if self.tree is not None:
            self.tree.reset()
        self.pool.clear()
        return True

    def _abort(self, rid: str | None, requested: bool) -> None:
        """Finish the matching requests (see :meth:`abort`); an unknown rid is a no-op, as in SGLang."""
        pending = [*self.waiting, *self.running, *([self.chunked] if self.chunked is not None else [])]
        if rid is not None and not any(r.rid == rid for r in pending):
            return  # finished already, or unknown (SGLang's tokenizer manager drops it; the HTTP answer is 200)
        for req in pending:
            if rid is None or req.rid == rid or (requested and req.rid.startswith(rid)):
                self._abort_one(req, requested)

    def _abort_one(self, req: EngineRequest, requested: bool) -> None:
        """Finish ``req`` with an abort reason and send its output so far (SGLang: ``Abort before prefill`` for a
        waiting request, ``Aborted`` for a running one)."""
        if req in self.waiting:
            self.waiting.remove(req)
            self._dequeued(req)
            message = "Abort before prefill"
        else:
            if req is self.chunked:
                self._stop_chunking()
            message = "Aborted"
        if requested:
            req.finish_reason = {"type": "abort", "message": message, "status_code": None, "err_type": None}
        else:
            req.finish_reason = {
                "type": "abort",
                "message": "client disconnected",
                "status_code": 499,
                "err_type": None,
            }
        self._finish(req, aborted=True)
        tail = req.decoder.flush() if req.decoder is not None else ""
        req.text += tail
        req.emit(Output([], tail, req.text, self._meta(req), True))

    def _dequeued(self, req: EngineRequest) -> None:
        with self._lock:
            self._queued -= 1
            self._queued_tokens -= len(req.fill_ids)

    def _fail_all(self, message: str) -> None:
        """Fail every request in flight (a scheduler step raised): queued, running, chunked, and those of the
        prefill batch that was running; each gets a last output with the error, and its KV and rid are released."""
        chunked = [self._stop_chunking()] if self.chunked is not None else []
        batch = [r for r in self.prefilling if not r.finished and r not in self.running and r not in chunked]
        self.prefilling = []
        for req in batch:
            self._drop_uncomputed(req)
        for req in self.running:  # the step may have died before computing its last token's KV in its new slot
            self._drop_uncomputed(req, keep=len(req.fill_ids) - 1)
        for req in [*self.waiting, *self.running, *chunked, *batch]:
            if req in self.waiting:
                self._dequeued(req)
            req.finish_reason = {"type": "abort", "message": message, "status_code": 500, "err_type": None}
            try:
                self._finish(req, aborted=True)
            except Exception:  # keep failing the others
                log.exception("releasing a failed request")
            req.emit(Output([], "", req.text, self._meta(req), True, error=(500, message)))
        self.waiting.clear()
        self.running.clear()

    # --- admission and prefill

    def _schedule_prefill(self) -> bool:
        """Build and run a prefill batch: the chunked request's next chunk first, then waiting requests while the
        chunk budget, ``max_prefill_tokens``, ``max_running`` and memory allow (the last one may be cut into a
        chunk). Returns whether a batch ran."""
        budget = self.config.chunked_prefill_size
        batch: list[tuple[EngineRequest, int]] = []
        tokens = 0
        if self.chunked is not None:
            req = self.chunked
            n = _chunk(len(req.fill_ids) - req.computed, budget)
            batch.append((req, n))
            tokens = n
            if req.computed + n < len(req.fill_ids):  # still more to come: this chunk fills the budget
                self._run_prefill(batch)
                return True
            self.chunked = None
        delay = self.faults.state.queue_delay_s
        now = time.monotonic()
        candidates = [r for r in self.waiting if now - r.queue_enter_mono >= delay]
        if self.config.schedule_policy == "lpm" and self.tree is not None and len(self.waiting) <= LPM_MAX_QUEUE:
            lengths = {id(r): self.tree.match_prefix(r.namespace, r.fill_ids[:-1]).length for r in candidates}
            candidates.sort(key=lambda r: -lengths[id(r)])
        for req in candidates:
            if len(self.running) + len(batch) >= self.config.max_running:
                break
            if tokens and tokens + len(req.fill_ids) > self.config.max_prefill_tokens:
                break
            left = None if budget is None else budget - tokens
            if left is not None and left <= 0:
                break
            if not self._admit(req):
                break  # head-of-line: wait until memory frees
            self.waiting.remove(req)
            self._dequeued(req)
            extend = len(req.fill_ids) - req.computed
            n = _chunk(extend, left)
            batch.append((req, n))
            tokens += n
            if n < extend:
                self.chunked = req
                break
        if not batch:
            return False
        self._run_prefill(batch)
        return True

    def _admit(self, req: EngineRequest) -> bool:
        fill = req.fill_ids
        if self.tree is not None:
            match = self.tree.match_prefix(req.namespace, fill[:-1])  # at least one token is computed
            self.tree.inc_lock_ref(match.node)
            prefix, node = match.slots, match.node
        else:
            prefix, node = torch.empty(0, dtype=torch.int64, device=self.device), None
        extend = len(fill) - len(prefix)
        reserve = max(req.max_new_tokens - len(req.output_ids), 0)
        free = self.pool.available + (self.tree.evictable_size if self.tree else 0)
        if free < extend + reserve + self.reserved:
            if node is not None and self.tree is not None:
                self.tree.dec_lock_ref(node)
            return False
        req.slots = torch.cat((prefix, self._alloc(extend)))
        req.tree_len = req.computed = len(prefix)
        req.last_node = node
        req.reserved = reserve
        self.reserved += reserve
        if req.cached_tokens is None:
            req.cached_tokens = len(prefix)
        return True

    def _alloc(self, n: int) -> torch.Tensor:
        short = n - self.pool.available
        if short > 0 and self.tree is not None:
            self.tree.evict(short)
        return self.pool.alloc(n)

    def _run_prefill(self, batch: list[tuple[EngineRequest, int]]) -> None:
        """One forward over each request's next ``n`` prompt tokens (plus one decode token per running request
        with mixed chunks); requests whose prompt is complete sample their first token and join the running batch."""
        start_ts, start = time.time(), time.monotonic()
        self.prefilling = [req for req, _ in batch]
        seqs: list[SeqInput] = []
        first_chunks = []
        for req, n in batch:
            if req.forward_entry_mono is None:  # its first chunk: the queue wait ends here
                first_chunks.append(req)
                req.queue_time += start - req.queue_enter_mono
                req.forward_entry_ts, req.forward_entry_mono = start_ts, start
                if self.metrics and req.log_metrics:
                    self.metrics.observe("sglang:queue_time_seconds", req.queue_time)
            done = req.computed
            seqs.append(SeqInput(req.fill_ids[done : done + n], done, req.slots[: done + n]))  # type: ignore[index]
        decoding = list(self.running) if self.config.enable_mixed_chunk else []
        seqs.extend(self._decode_inputs(decoding))
        logits = self.model(ForwardBatch(seqs, self.device, self.pool.dtype), self.pool)
        self.faults.check_step()
        self.forward_count += 1
        elapsed = time.monotonic() - start
        slowdown = self.faults.state.prefill_slowdown
        if slowdown > 1.0:
            time.sleep(elapsed * (slowdown - 1.0))
        complete = [i for i, (req, n) in enumerate(batch) if req.computed + n == len(req.fill_ids)]
        prefilled = [batch[i][0] for i in complete]
        rows = complete + list(range(len(batch), len(seqs)))
        if len(rows) < len(seqs):  # a chunk's logits are not sampled (SGLang discards them too)
            logits = logits[rows]
        next_ids = self._sample(logits, prefilled + decoding) if rows else []
        end_ts, end = time.time(), time.monotonic()
        measured = [r for r in first_chunks if r.log_metrics]  # a health probe's prefill is not the traffic's
        if measured:
            hit = sum(r.cached_tokens or 0 for r in measured)
            total = sum(len(r.fill_ids) for r in measured)
            self._last_hit_rate = hit / total if total else 0.0
            if self.metrics:
                self.metrics.set("sglang:cache_hit_rate", self._last_hit_rate)
        for req, n in batch:
            req.computed += n
            if req.computed < len(req.fill_ids):  # a chunk: share its KV so far, continue next iteration
                self._cache_unfinished(req)
                if self.metrics and req.log_metrics:
                    self.metrics.observe("sglang:per_stage_req_latency_seconds", end - start, stage="chunked_prefill")
        for req, tok in zip(prefilled, next_ids[: len(prefilled)], strict=True):
            req.prefill_finished_ts, req.prefill_finished_mono = end_ts, end
            if self.metrics and req.log_metrics:  # SGLang's prefill_forward: first forward entry → prefill end
                forward = end - (req.forward_entry_mono if req.forward_entry_mono is not None else start)
                self.metrics.observe("sglang:per_stage_req_latency_seconds", forward, stage="prefill_forward")
            self._cache_unfinished(req)
            self.running.append(req)
            self._append_token(req, tok)
        for req, tok in zip(decoding, next_ids[len(prefilled) :], strict=True):
            if self.metrics and req.log_metrics:
                self.metrics.observe("sglang:inter_token_latency_seconds", end - start)
            self._append_token(req, tok)
        self.prefilling = []

    def _stop_chunking(self) -> EngineRequest:
        """Take the chunked request out of prefill, giving back the slots of the prompt tokens not computed yet."""
        req = self.chunked
        assert req is not None
        self.chunked = None
        self._drop_uncomputed(req)
        return req

    def _drop_uncomputed(self, req: EngineRequest, keep: int | None = None) -> None:
        """Give back the slots past the first ``keep`` (default: the prompt tokens computed), whose KV is not known
        to be computed: none of it goes into the radix cache."""
        assert req.slots is not None
        keep = req.computed if keep is None else keep
        self.pool.free(req.slots[keep:])
        req.slots = req.slots[:keep]

    def _cache_unfinished(self, req: EngineRequest) -> None:
        """Insert the prompt's KV computed so far into the tree right after prefill (or a chunk of it), so that
        concurrent requests can share it."""
        if self.tree is None or req.slots is None:
            return
        fill = req.fill_ids[: req.computed]
        existing = self.tree.insert(req.namespace, fill, req.slots[: len(fill)])
        if existing > req.tree_len:
            self.pool.free(req.slots[req.tree_len : existing])  # another request inserted the same tokens first
        match = self.tree.match_prefix(req.namespace, fill)
        self.tree.inc_lock_ref(match.node)
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.slots = torch.cat((match.slots, req.slots[len(fill) :]))
        req.tree_len = len(fill)
        req.last_node = match.node

    # --- decode

    def _decode_step(self) -> None:
        reqs = list(self.running)
        start = time.monotonic()
        logits = self.model(ForwardBatch(self._decode_inputs(reqs), self.device, self.pool.dtype), self.pool)
        self.faults.check_step()
        self.forward_count += 1
        next_ids = self._sample(logits, reqs)
        step = time.monotonic() - start
        slowdown = self.faults.state.decode_slowdown
        if slowdown > 1.0:
            time.sleep(step * (slowdown - 1.0))
            step *= slowdown
        self._gen_throughput = 0.8 * self._gen_throughput + 0.2 * (len(reqs) / step if step > 0 else 0.0)
        for req, tok in zip(reqs, next_ids, strict=True):
            if self.metrics and req.log_metrics:
                self.metrics.observe("sglang:inter_token_latency_seconds", step)
            self._append_token(req, tok)

    def _decode_inputs(self, reqs: list[EngineRequest]) -> list[SeqInput]:
        """Each request's last token, with a new KV slot for it (admission reserved ``max_new_tokens``, so this
        never runs out)."""
        if not reqs:
            return []
        new_slots = self._alloc(len(reqs))
        seqs = []
        for i, req in enumerate(reqs):
            assert req.slots is not None
            req.slots = torch.cat((req.slots, new_slots[i : i + 1]))
            req.reserved -= 1
            self.reserved -= 1
            seqs.append(SeqInput([req.output_ids[-1]], len(req.slots) - 1, req.slots))
        return seqs

    def _sample(self, logits: torch.Tensor, reqs: list[EngineRequest]) -> list[int]:
        banned = []
        for r in reqs:
            early = len(r.output_ids) < r.params.min_new_tokens
            banned.append([*self.tokenizer.eos_token_ids, *r.params.stop_token_ids] if early else [])
        return self.sampler.sample(
            logits, [r.params for r in reqs], [r.output_ids for r in reqs], banned, [r.generator for r in reqs]
        )

    def _append_token(self, req: EngineRequest, tok: int) -> None:
        now = time.monotonic()
        if not req.output_ids:
            req.first_token_mono = now
            if self.metrics and req.log_metrics:
                streaming = _bool(req.stream)
                self.metrics.observe(
                    "sglang:time_to_first_token_seconds", now - req.received_mono, is_streaming=streaming
                )
        req.output_ids.append(tok)
        assert req.decoder is not None
        piece = req.decoder.push(tok)
        reason = self._finish_reason(req, tok)
        full = req.text + piece
        if reason is None:
            reason = self._match_stop_string(req, full, len(piece))
        if reason is not None:
            full += req.decoder.flush()
            if reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
                full = self._trim_stop(req, full, reason["matched"])
        delta = full[len(req.text) :] if len(full) > len(req.text) else ""
        req.text = full
        if reason is not None:
            req.finish_reason = reason
            self._finish(req, aborted=False)
        req.emit(Output([tok], delta, req.text, self._meta(req), reason is not None))

    def _finish_reason(self, req: EngineRequest, tok: int) -> dict[str, Any] | None:
        p = req.params
        if not p.ignore_eos and tok in self.tokenizer.eos_token_ids:
            return {"type": "stop", "matched": tok}
        if tok in p.stop_token_ids:
            return {"type": "stop", "matched": tok}
        if len(req.output_ids) >= req.max_new_tokens:
            return {"type": "length", "length": req.max_new_tokens}
        if len(req.fill_ids) >= self.config.context_length:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    @staticmethod
    def _match_stop_string(req: EngineRequest, full: str, new_chars: int) -> dict[str, Any] | None:
        for stop in req.params.stop:
            if full.find(stop, max(0, len(full) - new_chars - len(stop) + 1)) >= 0:
                return {"type": "stop", "matched": stop}
        return None

    @staticmethod
    def _trim_stop(req: EngineRequest, full: str, stop: str) -> str:
        at = full.find(stop)
        if at < 0:
            return full
        return full[: at + len(stop)] if req.params.no_stop_trim else full[:at]

    # --- finishing

    def _finish(self, req: EngineRequest, aborted: bool) -> None:
        if req.finished:
            return
        req.finished = True
        req.finished_ts, req.finished_mono = time.time(), time.monotonic()
        if req in self.running:
            self.running.remove(req)
        self._release(req)
        with self._lock:
            self._active.discard(req.rid)
        if self.metrics:
            if aborted:
                self.metrics.inc("sglang:num_aborted_requests_total")
            elif req.log_metrics:
                self._count_finished(req)
            self._publish_evictions()
        if self.tracer is not None:
            self._trace(req)

    def _release(self, req: EngineRequest) -> None:
        self.reserved -= req.reserved
        req.reserved = 0
        if req.slots is None:
            return
        if self.tree is None:
            self.pool.free(req.slots)
        else:
            tokens = req.fill_ids[: len(req.slots)]  # the last sampled token has no KV yet
            existing = self.tree.insert(req.namespace, tokens, req.slots)
            if existing > req.tree_len:
                self.pool.free(req.slots[req.tree_len : existing])
            if req.last_node is not None:
                self.tree.dec_lock_ref(req.last_node)
        req.slots, req.last_node = None, None

    def _count_finished(self, req: EngineRequest) -> None:
        m = self.metrics
        assert m is not None and req.finished_mono is not None
        streaming = _bool(req.stream)
        m.observe("sglang:e2e_request_latency_seconds", req.finished_mono - req.received_mono, is_streaming=streaming)
        m.inc("sglang:prompt_tokens_total", len(req.input_ids), is_streaming=streaming)
        m.inc("sglang:generation_tokens_total", len(req.output_ids), is_streaming=streaming)
        m.inc("sglang:num_requests_total", 1, is_streaming=streaming)
        if req.cached_tokens:
            m.inc("sglang:cached_tokens_total", req.cached_tokens, cache_source="device")

    def _publish_evictions(self) -> None:
        if self.tree is not None and self.metrics is not None:
            new = self.tree.evicted_tokens_total - self._last_evicted
            self._last_evicted = self.tree.evicted_tokens_total
            self.metrics.inc("sglang:evicted_tokens_total", new)

    def _publish_gauges(self) -> None:
        if self.metrics is None:
            return
        loads = self.loads()
        self.metrics.set("sglang:num_running_reqs", loads["num_running_reqs"])
        self.metrics.set("sglang:num_queue_reqs", loads["num_waiting_reqs"])
        self.metrics.set("sglang:num_used_tokens", loads["num_used_tokens"])
        self.metrics.set("sglang:token_usage", loads["token_usage"])
        self.metrics.set("sglang:max_total_num_tokens", loads["max_total_num_tokens"])
        self.metrics.set("sglang:gen_throughput", loads["gen_throughput"])

    def _meta(self, req: EngineRequest) -> dict[str, Any]:
        """``meta_info`` as SGLang 0.5.23 builds it (timing keys only with time stats on)."""
        cached = req.cached_tokens or 0
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": req.finish_reason if req.finished else None,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": cached,
            "reasoning_tokens": 0,
            "weight_version": "default",
            "num_retractions": 0,
        }
        if cached:
            meta["cached_tokens_details"] = {"device": cached, "host": 0}
        if self.config.time_stats:
            meta["queue_time"] = req.queue_time
            meta["forward_entry_time"] = req.forward_entry_ts
            meta["prefill_finished_time"] = req.prefill_finished_ts
            meta["storage_prefetch_wait"] = None
            meta["storage_staging_wait"] = None
        if req.finished and req.finished_mono is not None:
            meta["e2e_latency"] = req.finished_mono - req.received_mono
            if self.config.time_stats:
                meta["request_received_ts"] = req.received_ts
                meta["api_server_dispatch_finish_ts"] = req.dispatch_ts
                meta["first_token_latency"] = (
                    req.first_token_mono - req.received_mono if req.first_token_mono is not None else None
                )
                meta["request_finished_ts"] = req.finished_ts
                n = len(req.output_ids)
                if n > 1 and req.first_token_mono is not None:
                    tpot = (req.finished_mono - req.first_token_mono) / (n - 1)
                    meta["decode_throughput"] = 1.0 / tpot if tpot > 0 else None
        return meta

    def _trace(self, req: EngineRequest) -> None:
        def ns(ts: float | None) -> int | None:
            return int(ts * 1e9) if ts is not None else None

        prefill = decode = None
        if req.prefill_finished_mono is not None and req.forward_entry_mono is not None:
            prefill = req.prefill_finished_mono - req.forward_entry_mono
        if req.prefill_finished_mono is not None and req.finished_mono is not None:
            decode = req.finished_mono - req.prefill_finished_mono
        p = req.params
        attrs = finish_attributes(
            rid=req.rid,
            model=self.config.model_name,
            prompt=len(req.input_ids),
            completion=len(req.output_ids),
            cached=req.cached_tokens or 0,
            finish_reason=(req.finish_reason or {}).get("type", "abort"),
            params={
                "max_tokens": req.max_new_tokens,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "temperature": p.temperature,
                "n": p.n,
            },  # fmt: skip
            ttft=req.first_token_mono - req.received_mono if req.first_token_mono is not None else None,
            e2e=(req.finished_mono or req.received_mono) - req.received_mono,
            prefill=prefill,
            decode=decode,
        )
        rec = RequestTrace(
            rid=req.rid,
            parent=req.trace_parent,
            received_ns=int(req.received_ts * 1e9),
            forward_entry_ns=ns(req.forward_entry_ts),
            prefill_finished_ns=ns(req.prefill_finished_ts),
            finished_ns=int((req.finished_ts or time.time()) * 1e9),
            attributes=attrs,
        )
        try:
            emit_request_spans(self.tracer, rec)
        except Exception:  # tracing must never fail a request
            log.exception("emitting spans")


def _chunk(tokens: int, budget: int | None) -> int:
    """How many of ``tokens`` prompt tokens the next forward computes under a chunk ``budget`` (``None``: all)."""
    return tokens if budget is None else min(tokens, budget)


def _bool(value: bool) -> str:
    return "true" if value else "false"
