"""Saving and loading what training produces: PEFT-format adapters (orbax run checkpoints next)."""

from peftjax.checkpoint._adapter import adapter_tensors, load_adapter, read_config, save_adapter

__all__ = ["adapter_tensors", "load_adapter", "read_config", "save_adapter"]
