"""OPT in TensorFlow: ``TFOPTModel`` and ``TFOPTForCausalLM`` load the same checkpoints as the PyTorch classes
and give the same numbers; ``generate`` runs as one XLA-compiled loop, and ``export`` writes a SavedModel that
serves without optlm. Needs the ``tf`` extra: ``pip install "optlm[tf]"``.
"""

try:
    import tensorflow  # noqa: F401
except ImportError as e:
    raise ImportError(f'optlm.tf needs TensorFlow ({e.name} is not installed): pip install "optlm[tf]"') from e

from .opt import KVCache, TFOPTForCausalLM, TFOPTModel

__all__ = ["KVCache", "TFOPTForCausalLM", "TFOPTModel"]
