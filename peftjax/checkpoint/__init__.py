"""Training checkpoints (orbax). PEFT-format adapter files live with the tuners
(``peftjax.tuners``: ``save_adapter``, ``load_adapter``, ``read_config``)."""

from peftjax.checkpoint._orbax import CheckpointMismatchError, RunCheckpointer

__all__ = ["CheckpointMismatchError", "RunCheckpointer"]
