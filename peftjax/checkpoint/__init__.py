"""Checkpoints: PEFT-format adapters (both ways) and orbax training checkpoints."""

from peftjax.checkpoint._adapter import adapter_tensors, load_adapter, read_config, save_adapter
from peftjax.checkpoint._orbax import CheckpointMismatchError, RunCheckpointer

__all__ = ["CheckpointMismatchError", "RunCheckpointer", "adapter_tensors", "load_adapter",
           "read_config", "save_adapter"]
