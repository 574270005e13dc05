"""From a RunConfig to what the engine trains: data splits and loaders, models, states, steps.

Pure builders over the typed config; nothing here trains or writes files.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import backbones
from backbones import training
from backbones import weights as weights_lib
from data_pipeline import array_cache, quality_filter
from data_pipeline import augment as augment_lib
from data_pipeline.balance import balance_indices
from data_pipeline.datasets import Dataset, load_dataset
from data_pipeline.loader import finish, make_loader
from data_pipeline.preprocess import PreprocessConfig
from data_pipeline.splits import SOURCE, source_split_indices, split_indices
from ensembles.bundle.segmenter import Segmenter, load_segmenter
from ensembles.config import ConfigError, RunConfig


@dataclasses.dataclass
class Data:
    """A dataset, its patient-grouped splits and how its images are prepared."""

    dataset: Dataset
    splits: dict[str, np.ndarray]       # example indices into dataset.source
    train_indices: np.ndarray           # after balance resampling
    preprocess: PreprocessConfig
    augment: augment_lib.AugmentConfig | None
    class_weighted: bool                # members weight their classes (balance class_weights)
    quality: dict = dataclasses.field(default_factory=dict)   # quality_filter.filter_indices' report
    segmenter: Segmenter | None = None  # lung_mask auto: predicts dataset.source's masks

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    def eval_loader(self, split: str, batch_size: int) -> Any:
        """Every example of `split` once, in order."""
        return self.loader(self.splits[split], batch_size)

    def loader(self, indices: np.ndarray, batch_size: int) -> Any:
        """Every example of `indices` once, in order, preprocessed as in training."""
        return make_loader(self.dataset.source, indices, batch_size=batch_size,
                           preprocess=self.preprocess, shuffle=False, num_epochs=1,
                           drop_remainder=False)

    def train_loader(self, config: RunConfig, indices: np.ndarray | None = None,
                     epoch_records: int | None = None) -> Any:
        """All epochs' shuffled training batches in one (checkpointable) Grain iteration: uint8
        images that the train step finishes and augments on the device, or (without
        `augment.DEFAULT_ON_DEVICE`) images finished and augmented on the host. An epoch is
        `epoch_records` draws when given (a member's own examples), else one pass."""
        on_device = augment_lib.DEFAULT_ON_DEVICE
        return make_loader(self.dataset.source,
                           self.train_indices if indices is None else indices,
                           batch_size=config.training.batch_size, preprocess=self.preprocess,
                           augment=None if on_device else self.augment, shuffle=True,
                           seed=config.training.seed, num_epochs=config.training.epochs,
                           drop_remainder=True, worker_count=config.data.workers,
                           finish_on_host=not on_device, epoch_records=epoch_records)


def load_data(config: RunConfig) -> Dataset:
    """The dataset the config names (synthetic_cxr generated at its image size and seed)."""
    d = config.data
    options = ({"count": d.count, "image_size": d.image_size, "seed": config.training.seed}
               if d.dataset == "synthetic_cxr" else {})
    return load_dataset(d.dataset, data_dir=d.data_dir, classes=d.classes,
                        cache_dir=d.cache_dir, progress=config.training.progress, **options)


def build_data(config: RunConfig, dataset: Dataset | None = None) -> Data:
    """Dataset -> quality filter (on the unmasked images) -> lung masks -> patient-grouped
    splits -> balancing -> preprocessing (with normalization "dataset", the training split's
    mean/std); ValueError if a batch cannot fill or the masks are missing."""
    d, t = config.data, config.training
    dataset = dataset if dataset is not None else load_data(config)
    kept, quality = quality_filter.filter_indices(
        dataset, np.arange(len(dataset.labels)), quality_max=d.quality_max,
        drop_worst=d.quality_drop_worst, progress=t.progress)
    segmenter = None
    if d.lung_mask == "auto":
        segmenter = load_segmenter(d.segmenter)
        dataset = dataclasses.replace(dataset, source=segmenter.source(
            dataset.source, progress=t.progress), has_masks=True)
    elif d.lung_mask == "dataset" and not dataset.has_masks:
        raise ConfigError(f"lung_mask dataset: {dataset.name} ships no lung masks; use "
                          f"--lung-mask auto --segmenter RUN (python -m experiments.segment)")
    if d.split_recipe == SOURCE:
        local = source_split_indices(dataset.labels[kept], dataset.patient_ids[kept],
                                     dataset.source_splits[kept], seed=t.seed)
    else:
        local = split_indices(dataset.labels[kept], dataset.patient_ids[kept],
                              recipe=d.split_recipe, seed=t.seed)
    splits = {k: kept[v] for k, v in local.items()}
    train = splits["train"]
    if d.balance in ("downsample", "oversample"):
        train = balance_indices(train, dataset.labels, mode=d.balance, seed=t.seed)
    if len(train) // t.batch_size < 1:
        raise ConfigError(f"the training split has {len(train)} examples, fewer than one batch "
                          f"of {t.batch_size}; lower the batch size")
    preprocess = PreprocessConfig(image_size=d.image_size, channels=d.channels, clahe=d.clahe,
                                  lung_mask=d.lung_mask != "none")
    # Build the decode-once store here, so that --no-progress also silences its bar (the
    # loaders then find it built).
    array_cache.cached_source(dataset.source, preprocess, progress=t.progress)
    if d.normalization == "dataset":
        mean, std = array_cache.mean_std(dataset.source, splits["train"], preprocess)
        preprocess = dataclasses.replace(preprocess, normalization="dataset", mean=mean, std=std)
    else:
        preprocess = dataclasses.replace(preprocess, normalization=d.normalization)
    return Data(dataset=dataset, splits=splits, train_indices=train, preprocess=preprocess,
                augment=augment_lib.AugmentConfig() if d.augment else None,
                class_weighted=d.balance == "class_weights", quality=quality,
                segmenter=segmenter)


def build_model(config: RunConfig, *, num_classes: int | None):
    """The backbone in the configured compute dtype, BatchNorm synchronised over "batch"."""
    m = config.model
    options = {} if m.width is None else {"width": m.width}
    return backbones.create(m.backbone, num_classes=num_classes,
                            head=backbones.resolve_head(m.head, m.backbone),
                            dtype=training.compute_dtype(m.precision),
                            axis_name=training.parallel.AXIS, **options)


def model_options(config: RunConfig) -> dict:
    """What a bundle needs to rebuild the members' model: the resolved head and the width."""
    options = {"head": backbones.resolve_head(config.model.head, config.model.backbone)}
    if config.model.width is not None:
        options["width"] = config.model.width
    return options


def weights_path(config: RunConfig) -> Path:
    """The file `pretrained` names: a PATH itself, or for "imagenet" the Keras notop file in
    backbones.default_weights_path's folder (the full file if only that one is there)."""
    m = config.model
    if m.pretrained != "imagenet":
        return Path(m.pretrained)
    notop = backbones.default_weights_path(m.backbone, include_top=False)
    full = backbones.default_weights_path(m.backbone, include_top=True)
    return full if full.is_file() and not notop.is_file() else notop


def check_weights(config: RunConfig) -> None:
    """A `pretrained` PATH must be a file; a missing "imagenet" file is downloaded (verified)
    into the weights cache, as Keras's and torchvision's loaders do."""
    if not config.model.pretrained or weights_path(config).is_file():
        return
    if config.model.pretrained != "imagenet":
        raise ConfigError(f"--pretrained: {weights_path(config)} is not a file")
    weights_lib.fetch(config.model.backbone, include_top=False,
                      progress=config.training.progress)


def pretrained_variables(config: RunConfig, variables: dict) -> dict:
    """Merge the pretrained weights into freshly initialised `variables` (trunk only)."""
    grayscale = "sum" if config.data.channels == 1 else "repeat"  # 1 channel: sum RGB kernels
    loaded = backbones.load_pretrained(config.model.backbone, weights_path(config),
                                       include_top=False, grayscale=grayscale)
    return backbones.merge_pretrained(variables, loaded)


def optim_config(config: RunConfig, steps_per_epoch: int) -> training.OptimConfig:
    """The optimiser settings of the config, the schedule sized by `steps_per_epoch`."""
    t = config.training
    total = t.epochs * steps_per_epoch
    # a warm-up as long as the run would leave no step to decay over: at most half of it
    warmup = min(round(t.warmup_epochs * steps_per_epoch), total // 2)
    return training.OptimConfig(
        optimizer=t.optimizer, learning_rate=t.lr, schedule=t.schedule, warmup_steps=warmup,
        total_steps=total, weight_decay=t.weight_decay, clip_norm=t.clip_norm)


def input_shape(config: RunConfig) -> tuple[int, int, int, int]:
    """The NHWC shape of one example batch the models are initialised with."""
    return (1, config.data.image_size, config.data.image_size, config.data.channels)


def param_shapes(config: RunConfig):
    """A 2-class member model and its parameter shapes (for freeze-policy checks)."""
    model = build_model(config, num_classes=2)
    return model, jax.eval_shape(lambda: training.state.initial_variables(
        model, jax.random.PRNGKey(0), input_shape(config)))["params"]


def make_state_fn(config: RunConfig, steps_per_epoch: int | None = None, *,
                  optim: training.OptimConfig | None = None, pretrained: bool = True
                  ) -> Callable[[int, jax.Array], training.TrainState]:
    """make_state(num_classes, key) for the engine, its optimiser `optim` (default: the
    config's, sized by `steps_per_epoch`); `pretrained=False` skips loading the pretrained
    weights (a phase that starts from given variables replaces them anyway)."""
    shape = input_shape(config)
    if optim is None:
        optim = optim_config(config, steps_per_epoch)
    policy = config.model.freeze

    def make_state(num_classes: int, key: jax.Array) -> training.TrainState:
        model = build_model(config, num_classes=num_classes)
        variables = training.state.initial_variables(model, key, shape)
        if config.model.pretrained and pretrained:
            variables = pretrained_variables(config, variables)
        labels = training.freeze_labels(variables["params"], policy, model)
        tx = training.make_optimizer(optim, None if policy == "full" else labels)
        return training.create_train_state(model, tx, key, shape, variables=variables)

    return make_state


def on_device_input(key: jax.Array, images: jax.Array, *, preprocess: PreprocessConfig,
                    augment: augment_lib.AugmentConfig | None) -> jax.Array:
    """A training batch's uint8 images finished (channels, normalisation) and augmented on the
    device: a quarter of the bytes (a twelfth with 3 channels) cross from the host."""
    images = finish(images, preprocess)
    return images if augment is None else augment_lib.augment_batch(key, images, augment)


def make_train_step(config: RunConfig, data: Data) -> Callable:
    """The pure per-shard train step: freeze policy, label smoothing, and the input's
    normalisation and augmentation on the device (`on_device_input`, unless the loader did
    them: `augment.DEFAULT_ON_DEVICE` off)."""
    model, params = param_shapes(config)
    prepare = (functools.partial(on_device_input, preprocess=data.preprocess,
                                 augment=data.augment)
               if augment_lib.DEFAULT_ON_DEVICE else None)
    return training.make_train_step(
        label_smoothing=config.training.label_smoothing, freeze_policy=config.model.freeze,
        trainable=training.trainable_modules(params, config.model.freeze, model),
        prepare=prepare)


def fit_config(config: RunConfig, steps_per_epoch: int) -> training.FitConfig:
    """The engine's epochs, early stopping, checkpoints and progress bars."""
    t = config.training
    return training.FitConfig(epochs=t.epochs, steps_per_epoch=steps_per_epoch,
                              monitor=t.monitor, patience=t.early_stopping_patience,
                              keep_checkpoints=t.keep_checkpoints, progress=t.progress)


def training_memory_bytes(config: RunConfig, num_classes: int, members: int) -> int:
    """A rough upper estimate of one train step's memory, without compiling anything.

    Parameters with their gradients and Adam's two moments (4 copies), plus every module
    output of the forward pass kept for the backward pass and its gradient (2 copies), in
    float32, for `members` members trained at once on one global batch."""
    model = build_model(config, num_classes=num_classes)
    shape = (config.training.batch_size, *input_shape(config)[1:])

    def forward():
        x = jax.numpy.zeros(shape, jax.numpy.float32)
        variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
        _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"])
        return variables["params"], state["intermediates"]

    params, activations = jax.eval_shape(forward)
    count = sum(x.size for x in jax.tree.leaves(params)) * 4 + sum(
        x.size for x in jax.tree.leaves(activations)) * 2
    return count * 4 * members


def available_memory_bytes() -> int | None:
    """Memory the first device may use: the accelerator's limit, else the host's
    MemAvailable (Linux); None when unknown."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
