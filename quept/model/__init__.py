"""The model and the one place that runs it: `ModelRunner.execute(StepBatch)`.

model.py (the LLaMA-family forward over elastic linears), layer_ops.py (the elementwise ops around
them), layout.py (where each row's K/V goes: a pure read of block tables), kv_cache.py (the K/V
tensors), runner.py (StepBatch -> forward), checkpoint.py (the format on disk), loader.py.
"""
