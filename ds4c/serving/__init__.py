"""Serving: the engine's parts that are not the model (sampling, ...), on top of the runtime."""

from ds4c.serving.sampling import SampleResult, SamplerState, SamplingParams, finish_reasons, sample

__all__ = ["SampleResult", "SamplerState", "SamplingParams", "finish_reasons", "sample"]
