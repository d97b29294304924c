"""Scaling past one process: tensor parallelism as a transformation of a built model (tp.py), and starting or
joining the processes of a torch.distributed group (launch.py)."""

from .launch import joined, run
from .tp import tensor_parallel

__all__ = ["joined", "run", "tensor_parallel"]
