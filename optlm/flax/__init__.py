"""OPT in JAX with Flax NNX: ``FlaxOPTModel`` and ``FlaxOPTForCausalLM`` load the same checkpoints as the
PyTorch classes and give the same numbers; ``generate`` runs as one compiled loop. Needs the ``flax`` extra:
``pip install "optlm[flax]"``.
"""

try:
    import flax.nnx  # noqa: F401
    import jax  # noqa: F401
except ImportError as e:
    raise ImportError(f'optlm.flax needs JAX and Flax ({e.name} is not installed): pip install "optlm[flax]"') from e

from .opt import FlaxOPTForCausalLM, FlaxOPTModel, KVCache

__all__ = ["FlaxOPTForCausalLM", "FlaxOPTModel", "KVCache"]
