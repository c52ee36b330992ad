"""quept: serve one elastic-precision checkpoint at every bit-width, switching per request or per token.

Layers, top to bottom (imports point down only; `lint-imports` checks the contracts in pyproject.toml):

    quept.cli        the `quept` console script
    quept.server     FastAPI app: OpenAI protocol, auth, metrics, settings, lifecycle
    quept.build      checkpoint building: source readers, quantizer, RTN build, calibration
    quept.engine     continuous batching: scheduler, block manager, sequences, sampler, async engine
    quept.policies   precision controllers (fixed, load, entropy, load+entropy) and their cost model
    quept.eval       perplexity on fixed windows
    quept.model      the forward: model, layout, ModelRunner, KV tensors, checkpoint I/O, loader
    quept.precision  precision specs, plans, width segments, mixed allocation
    quept.backends   how an elastic linear runs: torch, native (C++), triton
    quept.kernels    the kernels and their plain-torch references

Heavy imports (transformers, triton, the C++ extension) are lazy.
"""

__version__ = "0.1.0"
