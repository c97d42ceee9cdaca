"""ds4c: ahead-of-time compiler and lightweight runtime for DeepSeek-V4-class models.

    >>> import ds4c
    >>> art = ds4c.compile("tiny", target="b200")
    >>> art.save("tiny.ds4")
    >>> model = ds4c.load("tiny.ds4")
    >>> model.generate([[1, 2, 3]], max_new_tokens=8)
"""

from ds4c.version import __version__

__all__ = ["Artifact", "CompiledModel", "Engine", "SamplingParams", "__version__", "compile", "load"]


def __getattr__(name: str):
    # Lazy imports keep `import ds4c` (and the CLI's --help) fast.
    if name == "compile":
        from ds4c.compiler import compile

        return compile
    if name == "load":
        from ds4c.runtime.model import load

        return load
    if name == "Artifact":
        from ds4c.artifact.artifact import Artifact

        return Artifact
    if name == "SamplingParams":
        from ds4c.runtime.sampling import SamplingParams

        return SamplingParams
    if name == "Engine":
        from ds4c.runtime.engine import Engine

        return Engine
    if name == "CompiledModel":
        from ds4c.runtime.model import CompiledModel

        return CompiledModel
    raise AttributeError(f"module 'ds4c' has no attribute '{name}'")
