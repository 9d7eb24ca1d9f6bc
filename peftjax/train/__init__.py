"""Training machinery: the trainable/frozen split, optimizer, losses, jitted steps, sharding, and
whole runs from a config (``run_training``, ``dry_run``)."""

from peftjax.train._losses import (IGNORE_INDEX, causal_lm_loss, sequence_classification_loss,
                                   token_classification_loss)
from peftjax.train._optim import OptimizerConfig, make_optimizer, make_schedule
from peftjax.train._sharding import (DEFAULT_RULES, DistributedSetupError, MeshConfig,
                                     batch_sharding, initialize_distributed, is_primary,
                                     make_mesh, partition_spec, process_rows, shard_batch,
                                     shard_state, state_shardings, to_host)
from peftjax.train._plan import dry_run, format_plan
from peftjax.train._run import (TrainingDiverged, build_model, evaluate_checkpoint,
                                load_trained_model, run_training)
from peftjax.train._stacking import ScanLayout
from peftjax.train._step import (make_eval_step, make_train_step, set_remat, set_scan_layers,
                                 split_model, summarize, trainable_paths)

__all__ = [
    "DEFAULT_RULES", "DistributedSetupError", "IGNORE_INDEX", "MeshConfig", "OptimizerConfig",
    "ScanLayout", "TrainingDiverged",
    "build_model", "dry_run", "evaluate_checkpoint", "format_plan", "load_trained_model",
    "run_training", "batch_sharding",
    "initialize_distributed", "is_primary", "make_mesh", "partition_spec", "process_rows",
    "shard_batch", "shard_state", "state_shardings", "to_host", "causal_lm_loss",
    "make_eval_step", "make_optimizer",
    "make_schedule", "make_train_step", "sequence_classification_loss", "set_remat",
    "set_scan_layers", "split_model", "summarize", "token_classification_loss", "trainable_paths",
]
