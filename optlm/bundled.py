"""The small OPT model shipped inside the package, used when no model is named (works fully offline)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).parent / "assets" / "opt-gutenberg"
BUNDLED_MODEL_NAME = "optlm/opt-gutenberg (bundled)"
# Short names that mean the bundled model wherever a model directory or hub id is accepted (a local
# directory of the same name wins).
BUNDLED_ALIASES = ("opt-gutenberg", "optlm/opt-gutenberg")


def bundled_model_path() -> Path:
    """Directory of the bundled model; a clear error if this installation lacks it."""
    if not (BUNDLED_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled default model is not installed ({BUNDLED_MODEL_DIR} is missing); "
            "pass --model with a checkpoint directory or hub id such as facebook/opt-125m"
        )
    return BUNDLED_MODEL_DIR
