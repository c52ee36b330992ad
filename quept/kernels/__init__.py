"""Compute kernels for the elastic linear and their plain-torch references.

Knows nothing of the engine. Heavy imports (triton, the C++ extension) happen in submodules.
"""
