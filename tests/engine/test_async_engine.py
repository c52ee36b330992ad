"""The asyncio front: streams, early close aborts (KV blocks freed), the queue bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from quept.engine.async_engine import AsyncEngine, EngineStoppedError, QueueFullError
from quept.engine.engine import EngineConfig, LLMEngine
from quept.engine.sequence import FinishReason, GenerationRequest
from quept.model.loader import load_model


@pytest.fixture(scope="module")
def lm(tiny_ckpt: Path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(tiny_ckpt, backend="torch")
    torch.set_num_threads(n)


def req(lm, rid: str, n: int) -> GenerationRequest:
    return GenerationRequest(rid, tuple(lm.encode_chat("hello world")), n, spec=lm.parse("w8"), ignore_eos=True)


def test_streams_tokens_and_aborts_on_early_close(lm):
    async def main() -> None:
        engine = LLMEngine.from_loaded(lm, EngineConfig(max_batch=2, kv_cache_bytes=1 << 20))
        front = AsyncEngine(engine, max_queue=1)
        front.start()
        full = [o async for o in front.generate(req(lm, "full", 5))]
        assert [len(o.new_token_ids) for o in full] == [1] * 5
        assert full[-1].finished and full[-1].finish_reason is FinishReason.LENGTH

        long = front.submit(req(lm, "long", 200))
        async for out in long:
            if out.num_output_tokens >= 3:
                break
        await asyncio.sleep(0)  # the async generator's finally runs on close
        long.abort()
        for _ in range(200):
            if engine.blocks.usage == 0.0 and front.num_unfinished == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.blocks.usage == 0.0 and front.num_unfinished == 0

        streams = [front.submit(req(lm, f"q{i}", 50)) for i in range(3)]  # max_batch 2 + max_queue 1
        with pytest.raises(QueueFullError) as err:
            front.submit(req(lm, "over", 5))
        assert err.value.retry_after_s >= 1
        for s in streams:
            s.abort()
        await front.shutdown()
        with pytest.raises(EngineStoppedError):
            front.submit(req(lm, "late", 5))

    asyncio.run(main())
