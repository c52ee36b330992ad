"""quept runtime: checkpoint I/O, quantizer, model, KV cache, sampler, scheduler, controller, engine.

Knows nothing of HTTP. Heavy imports (transformers, triton) are lazy.
"""

__version__ = "0.1.0"
