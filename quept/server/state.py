"""The server's life cycle: loading (503), ready, draining (503), stopped; the engine it owns.

Loading runs in a worker thread after the HTTP server is up, so `/health` answers 503 while a
checkpoint loads (or the default model is built on first use). Draining (SIGTERM) stops
admitting new requests; in-flight ones finish within `drain_timeout_s`; then the engine stops.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from quept.engine.async_engine import AsyncEngine
from quept.engine.engine import EngineConfig, LLMEngine
from quept.engine.sequence import GenerationRequest
from quept.policies import make_controller
from quept.server.logprobs import TokenStrings
from quept.server.metrics import ServerMetrics
from quept.server.settings import Settings
from quept.structured.grammar import Grammar, GrammarCompiler, GrammarSpec

log = logging.getLogger(__name__)


class Status(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


def ensure_checkpoint(settings: Settings, in_child: bool = True) -> Path:
    """The checkpoint to serve; with none configured, build the default model into the cache once
    (in a child process unless `in_child` is False: the server lives long, the build's memory must go)."""
    if settings.checkpoint is not None:
        return Path(settings.checkpoint)
    from quept.build.builder import ensure_default_checkpoint

    return ensure_default_checkpoint(settings.cache_dir, calibrate=settings.calibrate, in_child=in_child)


def load_for_serving(settings: Settings) -> Any:
    """Load (building first if needed) the checkpoint with the configured backend."""
    from quept.model.loader import load_model

    loaded = load_model(ensure_checkpoint(settings), backend=settings.backend, device=settings.device)
    if loaded.tokenizer is None:
        raise ValueError(f"checkpoint {loaded.ckpt.path} has no tokenizer files; the server needs one")
    return loaded


def configure_backend(loaded: Any, settings: Settings) -> None:
    """torch backend: keep dense weights of `cached_widths` widths (0: all), so mixed batches never rebuild."""
    backend = loaded.backend
    if hasattr(backend, "max_cached_widths"):
        backend.max_cached_widths = settings.cached_widths or len(loaded.widths)


def warm_up(engine: LLMEngine, loaded: Any) -> None:
    """One short generation at the default precision (materializes its weights before the first request)."""
    ids = tuple(loaded.tokenizer("warm up")["input_ids"]) or (0,)
    engine.add_request(GenerationRequest("warmup", ids, max_tokens=2, ignore_eos=True))
    engine.run_to_completion()


class ServerState:
    def __init__(self, settings: Settings, loaded: Any = None) -> None:
        self.settings = settings
        self.status = Status.LOADING
        self.error: str | None = None
        self.loaded = loaded
        self.engine: AsyncEngine | None = None
        self.metrics = ServerMetrics()
        self.on_fatal: Callable[[str], None] | None = None  # the CLI stops the server when loading fails
        self.model_name = settings.model_name
        self.max_model_len = 0
        # tokenization and chat templating: off the event loop (a long prompt takes seconds), one at a time
        # (a Hugging Face tokenizer is not meant to be entered by two threads at once)
        self._text_work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quept-tokenize")
        self._grammar_work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quept-grammar")
        self.grammars: GrammarCompiler | None = None  # once loaded

    async def compile_grammar(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of `spec` (cached), built on the grammar thread (a large schema takes up to a
        second; tokenization goes on meanwhile). Raises `GrammarError`."""
        assert self.grammars is not None
        compiler = self.grammars
        cached = compiler.has(spec)
        t0 = time.perf_counter()
        grammar = await asyncio.get_running_loop().run_in_executor(self._grammar_work, compiler.compile, spec)
        if not cached:
            self.metrics.grammar_compile.observe(time.perf_counter() - t0)
        self.metrics.structured.labels(kind=spec.kind).inc()
        return grammar

    async def off_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the text-work thread and await its result (its exceptions propagate)."""
        return await asyncio.get_running_loop().run_in_executor(self._text_work, fn)

    @functools.cached_property
    def token_strings(self) -> TokenStrings:
        """Single tokens' text, memoized (logprobs name their tokens with it)."""
        return TokenStrings(self.loaded.tokenizer)

    @property
    def ready(self) -> bool:
        return self.status is Status.READY

    async def load(self) -> None:
        # All model work before serving (loading, profiling, the engine's KV cache, warm-up) runs on one
        # short-lived thread that exits before the engine thread serves: every thread that runs a parallel torch
        # op keeps an OpenMP team for as long as it lives, and beside a second team libgomp counts more threads
        # than cores and stops spinning at its barriers, so the engine's worker sleeps and is woken in every
        # parallel region. Measured on 2 cores under 16 streaming w4 clients: with the KV cache zero-filled on the
        # event loop's thread, ~200 worker sleeps per step and 26-28 ms forwards (19 ms alone), ~530 tok/s;
        # with this, 2 sleeps in the whole run and 630-650 tok/s.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quept-load") as loader:
            await self._load(loader)

    async def _load(self, loader: ThreadPoolExecutor) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            if s.threads:
                torch.set_num_threads(s.threads)
            sys.setswitchinterval(s.gil_switch_ms / 1000)  # process-wide, like the threads above
            if self.loaded is None:
                self.loaded = await loop.run_in_executor(loader, load_for_serving, s)
            loaded = self.loaded
            configure_backend(loaded, s)
            # adaptive policies may profile the model (load) or calibrate a threshold (entropy): off the event loop
            controller = await loop.run_in_executor(
                loader, functools.partial(make_controller, s.policy, loaded, s.default_precision, **s.policy_options()))
            config = EngineConfig(max_batch=s.max_batch, max_batched_tokens=max(s.max_batched_tokens, s.max_batch),
                                  kv_cache_bytes=s.kv_cache_mb << 20, block_size=s.block_size,
                                  prefix_caching=s.prefix_caching,
                                  max_model_len=s.max_model_len, small_batch_rows=s.small_batch_rows,
                                  small_batch_threads=max(1, torch.get_num_threads() - 1))
            # the KV cache's zero fill is a parallel op: on the loader thread too, so that no OpenMP team is left
            # on the event loop's thread
            engine = await loop.run_in_executor(loader, LLMEngine.from_loaded, loaded, config, controller)
            if s.warmup:
                await loop.run_in_executor(loader, warm_up, engine, loaded)
            engine.observer = self.metrics
            self.grammars = GrammarCompiler(loaded.tokenizer, loaded.model.args.vocab_size, engine.eos_ids)
            self.max_model_len = engine.max_model_len
            self.engine = AsyncEngine(engine, s.max_queue)
            self.engine.start(asyncio.get_running_loop())
            self.metrics.bind(lambda: engine.scheduler.num_running, lambda: self.engine.num_waiting if self.engine else 0,
                              lambda: engine.blocks.usage)
            self.metrics.bind_controller(controller)
            if self.status is Status.LOADING:
                self.status = Status.READY
            log.info("ready: %s (%s backend, default precision %s, policy %s)", self.model_name,
                     loaded.backend.name, controller.default_plan.name, controller.name)
        except Exception as err:  # any load failure becomes a 503 with its message, and stops the CLI server
            self.status = Status.FAILED
            self.error = f"{type(err).__name__}: {err}"
            log.error("loading failed: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    def begin_drain(self) -> None:
        """Stop admitting (health turns 503); in-flight requests go on."""
        if self.status in (Status.READY, Status.LOADING):
            log.info("draining: no new requests; in-flight ones have %.0f s to finish", self.settings.drain_timeout_s)
            self.status = Status.DRAINING
        if self.engine is not None:
            self.engine.stop_accepting()

    async def shutdown(self) -> None:
        self.begin_drain()
        if self.engine is not None:
            # uvicorn has already given in-flight HTTP requests `drain_timeout_s`; what is left has no client
            if not await self.engine.drain(min(1.0, self.settings.drain_timeout_s)):
                log.warning("drain timeout: aborting %d requests", self.engine.num_unfinished)
            await self.engine.shutdown()
        self._text_work.shutdown(wait=False, cancel_futures=True)
        self._grammar_work.shutdown(wait=False, cancel_futures=True)
        if self.status is not Status.FAILED:  # a failed load stays failed: the exit status reads it
            self.status = Status.STOPPED
