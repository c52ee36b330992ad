"""The serving engine: which sequences run in a step, their KV blocks, sampling and stopping.

Knows nothing of HTTP. `LLMEngine.step()` schedules, asks the controller for plans, hands one
`StepBatch` to the `ModelRunner`, samples and updates; `AsyncEngine` runs it on a thread.
"""
