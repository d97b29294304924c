"""Training: one loop (``trainer``) for every task (``tasks``: causal LM, sequence classification), the
labelled data of the task heads (``labelled``) and their metrics (``metrics``)."""

from .tasks import TASKS, lm_loss
from .trainer import (
    SAVE_SLEEP_ENV,
    TrainArgs,
    TrainingError,
    TrainResult,
    list_checkpoints,
    lr_at,
    make_optimizer,
    return_freed_memory,
    save_checkpoint,
    train,
)

__all__ = ["SAVE_SLEEP_ENV", "TASKS", "TrainArgs", "TrainResult", "TrainingError", "list_checkpoints", "lm_loss",
           "lr_at", "make_optimizer", "return_freed_memory", "save_checkpoint", "train"]
