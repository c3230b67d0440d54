# Installed as site-packages/torchaudio/__init__.py in .venv-lf by the Makefile. llamafactory imports
# torchaudio at module level (multimodal audio plugin only); PyPI has no CPU torchaudio matching
# torch 2.13, and the CUDA build fails to load. Any real use raises ImportError.
__version__ = "0.0.0+stub"


def __getattr__(name):
    raise ImportError(f"torchaudio is a stub in this environment (asked for {name!r})")
