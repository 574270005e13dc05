"""The training engine: train state, optimisers, freeze policies, the pure per-shard train
step, data-parallel wrappers (shard_map / pmap), one atomic orbax checkpoint per epoch,
the one training loop (a member group of M >= 1 members) and the one predict loop.

    from backbones import training
    tx = training.make_optimizer(training.OptimConfig(learning_rate=1e-3))
    state = training.create_train_state(model, tx, key, (1, 64, 64, 1))
    dp = training.data_parallel("shard_map")
    step = dp.train(training.make_train_step())
    replicated, metrics = step(dp.replicate(state), batch)
"""

from backbones.training.checkpoint import Checkpointer, NonFiniteError
from backbones.training.freeze import (
    freeze_labels,
    parse_policy,
    stages,
    trainable_modules,
)
from backbones.training.loop import (
    MONITORS,
    EarlyStopping,
    FitConfig,
    FitResult,
    TrainingDiverged,
    ValMetrics,
    classification_metrics,
    fit,
)
from backbones.training.optim import OPTIMIZERS, SCHEDULES, OptimConfig, make_optimizer
from backbones.training.parallel import PARALLEL_MODES, DataParallel, data_parallel
from backbones.training.precision import PRECISIONS, compute_dtype
from backbones.training.predict import member_logits, predict_batches, predict_logits
from backbones.training.state import TrainState, create_train_state
from backbones.training.step import make_eval_step, make_train_step

__all__ = [
    "MONITORS", "OPTIMIZERS", "PARALLEL_MODES", "PRECISIONS", "SCHEDULES", "Checkpointer",
    "DataParallel", "EarlyStopping", "FitConfig", "FitResult", "NonFiniteError", "OptimConfig",
    "TrainState", "TrainingDiverged", "ValMetrics", "classification_metrics", "compute_dtype",
    "create_train_state", "data_parallel", "fit", "freeze_labels", "make_eval_step",
    "make_optimizer", "make_train_step", "member_logits", "parse_policy", "predict_batches",
    "predict_logits", "stages", "trainable_modules"]
