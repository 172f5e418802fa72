"""Feeding rows to deep-learning frameworks: a numpy batching core, and thin
adapters for PyTorch (:mod:`.torch`) and TensorFlow (:mod:`.tensorflow`).

Neither framework is imported until one of its adapters is used.
"""
