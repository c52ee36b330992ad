"""The asyncio front of the engine: steps run in a background thread, tokens arrive on asyncio queues.

`AsyncEngine.submit` validates a request in the caller (so errors surface before any streaming
starts), enforces the queue bound, and hands the sequence to the engine thread. The engine thread
takes new sequences and aborts between steps (continuous batching), runs `LLMEngine.step()`, and
delivers each step's outputs to the event loop with one `call_soon_threadsafe`. The event loop
never runs model work. A `RequestStream` is an async iterator of `RequestOutput`s; closing it
early (a client that went away) aborts the sequence, which frees its KV blocks at the next step
boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from quept.engine.engine import LLMEngine
from quept.engine.sequence import FinishReason, GenerationRequest, RequestOutput, Sequence

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests than `max_batch + max_queue` are unfinished; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or has stopped and takes no new requests."""


class EngineFailedError(RuntimeError):
    """The request ended in error: the engine failed it (code `engine_failed`), the server cut it
    short (`drain_timeout`), or its grammar failed mid-way (`grammar_error`, with the field in `param`)."""

    def __init__(self, message: str, code: str = "engine_failed", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param  # the request field at fault (grammar_error)


class RequestStream:
    """Outputs of one request as they are produced; iterate with `async for`."""

    def __init__(self, engine: "AsyncEngine", seq: Sequence) -> None:
        self._engine = engine
        self.request_id = seq.request_id
        self.precision = seq.plan.name  # the plan the request starts at (what the X-Precision header reports)
        self.num_prompt_tokens = seq.num_prompt
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self.queue.get()
                if out.request_finished:
                    self.finished = True
                if out.error is not None:
                    raise EngineFailedError(out.error, out.error_code, out.error_param)
                yield out
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the sequence (idempotent; a no-op once it finished)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 64) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._adds: list[Sequence] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}  # touched only on the event loop
        self._unfinished = 0  # submitted and not yet finished (event loop side)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self.last_error: str | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="quept-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting and wait until every request finished (True) or the timeout passed (False)."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while self._unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._unfinished == 0

    def cut_all(self, message: str) -> int:
        """End every unfinished request now with an error (`drain_timeout`), on the event loop: the
        streams see it at once, however busy the engine thread is; their sequences are aborted."""
        cut = list(self._streams.values())
        for stream in cut:
            out = RequestOutput(stream.request_id, [], "", stream.num_prompt_tokens, 0, stream.precision, finished=True,
                                finish_reason=FinishReason.ABORT, error=message, error_code="drain_timeout",
                                request_finished=True)
            stream.queue.put_nowait(out)
            self.abort(stream.request_id)
        self._streams.clear()
        self._unfinished = 0
        return len(cut)

    async def shutdown(self) -> None:
        """Abort what is left and stop the engine thread."""
        self.stop_accepting()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    # ------------------------------------------------------------------ requests

    @property
    def num_unfinished(self) -> int:
        return self._unfinished

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted to the running batch (handed over or in the scheduler's queue)."""
        return len(self._adds) + self.engine.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    def retry_after_s(self) -> int:
        return 1

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and enqueue; raises ValueError/ContextLengthError/PrecisionError, QueueFullError, EngineStoppedError."""
        if not self._accepting or not self.is_running:
            raise EngineStoppedError("the server is shutting down" if not self._accepting else "the engine is not running")
        limit = self.engine.config.max_batch + self.max_queue
        if self._unfinished >= limit:
            raise QueueFullError(
                f"{self._unfinished} requests are in flight (max_batch {self.engine.config.max_batch} + "
                f"max_queue {self.max_queue}); retry later", self.retry_after_s())
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        seq = self.engine.make_sequence(request)
        stream = RequestStream(self, seq)
        self._streams[seq.request_id] = stream
        self._unfinished += 1
        with self._cond:
            self._adds.append(seq)
            self._cond.notify()
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit and yield outputs; leaving the loop early aborts the request."""
        stream = self.submit(request)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        """Abort a request from the event loop (its KV blocks are freed before the next step)."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        engine = self.engine
        log.info("engine thread started")
        while True:
            with self._cond:
                while not (self._stopping or self._adds or self._aborts or engine.has_unfinished()):
                    self._cond.wait()
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            outputs: list[RequestOutput] = []
            for seq in adds:
                try:
                    engine.add_sequence(seq)
                except ValueError as err:  # e.g. a duplicate request id: fail that request, keep serving
                    seq.finish(FinishReason.ABORT)
                    out = seq.make_output([], seq.plan.name)
                    out.error = str(err)
                    out.request_finished = True
                    outputs.append(out)
            for rid in aborts:
                outputs.extend(engine.abort(rid))
            if stopping:
                outputs.extend(engine.abort_all())
                self._deliver(outputs)
                break
            if engine.has_unfinished():
                try:
                    outputs.extend(engine.step())
                except Exception as err:  # a failed step must not hang every client: fail them and go on
                    log.exception("engine step failed; aborting %d requests", engine.num_unfinished)
                    self.last_error = f"{type(err).__name__}: {err}"
                    outputs.extend(engine.abort_all(error=f"engine step failed: {self.last_error}"))
            if outputs:
                self._deliver(outputs)
        log.info("engine thread stopped")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, outputs)
        except RuntimeError:  # the loop closed between the check and the call
            log.debug("event loop closed; dropped %d outputs", len(outputs))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """On the event loop: route outputs to their streams."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.request_finished:
                if self._streams.pop(out.request_id, None) is not None:
                    self._unfinished -= 1
            if stream is not None:
                stream.queue.put_nowait(out)
