"""A loaded bundle at work: members' outputs, the combiner, decisions and their explanation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

import backbones
from backbones.training.predict import member_logits, stacked_apply
from data_pipeline import leakage
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig
from ensembles.bundle.schema import BundleError, first_line
from ensembles.bundle.segmenter import Segmenter
from ensembles.combine.explain import decision_columns
from ensembles.combine.groups import MemberGroup
from ensembles.combine.meta import MetaClassifier
from ensembles.combine.operating_points import flag
from ensembles.combine.tasks import Tasks
from ensembles.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What a loaded bundle says about source[indices], in that order. Probability columns,
    decisions and labels all index `class_names` (the model's classes)."""

    class_names: tuple[str, ...]
    proba: np.ndarray       # [N, K] class probabilities
    decisions: np.ndarray   # [N] class decisions (the combiner's rule or argmax)
    labels: np.ndarray      # [N] the source's labels in the model's order; -1: unknown class
    indices: np.ndarray     # [N] positions in the source
    # per-row columns saying how each decision was reached (ensembles.combine.explain)
    explanation: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    thresholds: list[float | None] | None = None   # per class, when the operating point applies
    flags: np.ndarray | None = None                 # [N, K] p_k >= thresholds[k]


def concat_predictions(parts: Sequence[Predictions]) -> Predictions:
    """One Predictions from consecutive parts of one model's predictions (rows in order)."""
    first = parts[0]
    cat = np.concatenate
    return Predictions(first.class_names, cat([p.proba for p in parts]),
                       cat([p.decisions for p in parts]), cat([p.labels for p in parts]),
                       cat([p.indices for p in parts]),
                       {k: cat([p.explanation[k] for p in parts]) for k in first.explanation},
                       first.thresholds,
                       None if first.flags is None else cat([p.flags for p in parts]))


def model_order(labels: np.ndarray, label_names: Sequence[str] | None,
                class_names: Sequence[str]) -> np.ndarray:
    """Source labels (indices into `label_names`) as indices into the model's `class_names`
    (-1 for a class the model lacks); unchanged when `label_names` is None."""
    labels = np.asarray(labels)
    if label_names is None:
        return labels
    lookup = np.array([list(class_names).index(c) if c in class_names else -1
                       for c in label_names], np.int64)
    return lookup[labels] if len(labels) else labels


def member_applies(backbone: str, model_options: dict, stacks: Sequence[MemberGroup]
                   ) -> list:
    """One jit(vmap(apply)) per member group: images [B, ...] -> logits [M_g, B, C_g]."""
    return [stacked_apply(backbones.create(backbone, num_classes=s.num_classes,
                                           **model_options)) for s in stacks]


def member_probabilities(applies: Sequence, variables: Sequence[dict],
                         stacks: Sequence[MemberGroup], batches: Iterable[dict]
                         ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per-member probabilities [N, C_m] (member order), labels and indices over preprocessed
    batches, through the engine's predict loop (every process's rows, padding dropped)."""
    logits, labels, indices = member_logits(applies, variables, [s.members for s in stacks],
                                            batches)
    return [softmax(z, axis=-1) for z in logits], labels, indices


def _loader(source, indices, preprocess: PreprocessConfig, batch_size: int):
    return make_loader(source, indices, batch_size=batch_size, preprocess=preprocess,
                       shuffle=False, num_epochs=1, drop_remainder=False)


@dataclasses.dataclass
class Bundle:
    """A loaded ensemble (or single model): members' variables, combiner, preprocessing.
    Build it by keyword: its fields are many and several share a type."""

    run_dir: Path
    backbone: str
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    tasks: Tasks
    groups: list[MemberGroup]   # config.json's "stacks"
    variables: list[dict]
    combiner: Any
    meta: MetaClassifier | None
    temperature: float | None
    kind: str

    model_options: dict = dataclasses.field(default_factory=dict)
    operating_point: str | None = None          # what the thresholds aim for, e.g. "youden"
    thresholds: list[float | None] | None = None  # per class, on the rule's probabilities
    hashes_file: Path | None = None     # the train_hashes piece, None for older runs
    segmenter: Any = None               # ensembles.bundle.segmenter.Segmenter (lung_mask auto)

    def __post_init__(self):
        self._apply = member_applies(self.backbone, self.model_options, self.groups)

    def with_masks(self, source):
        """`source` as this bundle's preprocessing needs it: with the segmenter's masks when
        the run was trained on predicted masks, else unchanged."""
        return source if self.segmenter is None else self.segmenter.source(source)

    @property
    def needs_shipped_masks(self) -> bool:
        """Trained on the lung masks its dataset shipped: every image needs its mask."""
        return self.preprocess.lung_mask and self.segmenter is None

    def with_segmenter(self, segmenter: Segmenter) -> Bundle:
        """This bundle masking every image with `segmenter`'s masks in place of the dataset's
        or the recorded segmenter's; ConfigError for a run trained on unmasked images (masking
        would change the input distribution it was trained on)."""
        if not self.preprocess.lung_mask:
            raise ConfigError(f"--segmenter: {self.run_dir} was trained on unmasked images; "
                             f"masking them would change the input it was trained on")
        return dataclasses.replace(self, segmenter=segmenter)

    def lung_masks(self, images: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray | None] | None = None) -> list | None:
        """The masks `preprocess` needs for raw images: None when the model masks nothing,
        the segmenter's, else `masks` (ConfigError when one is missing)."""
        if not self.preprocess.lung_mask:
            return None
        if self.segmenter is not None:
            return self.segmenter.masks(images)
        if masks is None or any(m is None for m in masks):
            raise ConfigError(f"{self.run_dir} was trained on lung-masked images with the "
                             f"dataset's masks: every image needs its mask")
        return list(masks)

    def training_hashes(self) -> leakage.TrainingHashes | None:
        """The hashes of the images the members were fitted on (read now), or None."""
        if self.hashes_file is None:
            return None
        try:
            return leakage.load_training_hashes(self.hashes_file)
        except ValueError as error:
            raise BundleError(first_line(error)) from None

    def member_outputs(self, batches: Iterable[dict]
                       ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Per-member probabilities [N, C_m], labels and indices over preprocessed batches."""
        return member_probabilities(self._apply, self.variables, self.groups, batches)

    def combine(self, member_probs: list[np.ndarray], *, use_meta: bool = False) -> np.ndarray:
        """K-class probabilities from member probabilities (the rule, or the meta-classifier)."""
        if use_meta:
            if self.meta is None:
                raise BundleError(f"{self.run_dir} has no saved meta-classifier")
            return self.meta.predict_proba(self.meta.features({self.tasks.strategy:
                                                               member_probs}))
        return self.combiner.predict_proba(member_probs)

    def decide(self, member_probs: list[np.ndarray]) -> np.ndarray:
        """Class decisions of the rule (the cascade's stage rule, OvO votes, else argmax)."""
        return self.combiner.predict(member_probs)

    def predict(self, source, indices, *, batch_size: int = 32, use_meta: bool = False,
                label_names: Sequence[str] | None = None) -> Predictions:
        """Preprocess source[indices] (raw examples), run the members, combine and decide;
        `label_names` (the source's class names) maps its labels to the model's order."""
        probs, labels, idx = self.member_outputs(
            _loader(self.with_masks(source), indices, self.preprocess, batch_size))
        proba = self.combine(probs, use_meta=use_meta)
        decisions = proba.argmax(1) if use_meta else self.decide(probs)
        # the thresholds were chosen on the rule's probabilities: not for the meta-classifier's
        thresholds = None if use_meta else self.thresholds
        return Predictions(self.class_names, proba, decisions,
                           model_order(labels, label_names, self.class_names), idx,
                           decision_columns(self.combiner, probs, self.class_names,
                                            use_meta=use_meta),
                           thresholds, None if thresholds is None else flag(proba, thresholds))


@dataclasses.dataclass
class StackBundle:
    """A loaded stack run: component bundles and the meta-classifier over their members."""

    run_dir: Path
    class_names: tuple[str, ...]
    names: tuple[str, ...]
    components: list[Bundle]
    meta: MetaClassifier
    kind: str = "stack"
    operating_point: None = None    # decided by the meta-classifier: no per-class thresholds

    def predict(self, source, indices, *, batch_size: int = 32, use_meta: bool = False,
                label_names: Sequence[str] | None = None) -> Predictions:
        """Each component on source[indices] with its own preprocessing, then the meta-
        classifier; decisions are its argmax. A stack always combines with its meta-
        classifier: `use_meta` is accepted for the shared signature and changes nothing."""
        blocks = {}
        for name, component in zip(self.names, self.components, strict=True):
            # unshuffled loaders over the same indices: labels and idx agree across components
            blocks[name], labels, idx = component.member_outputs(
                _loader(component.with_masks(source), indices, component.preprocess,
                        batch_size))
        proba = self.meta.predict_proba(self.meta.features(blocks))
        return Predictions(self.class_names, proba, self.meta.classes_[proba.argmax(1)],
                           model_order(labels, label_names, self.class_names), idx,
                           decision_columns(None, [proba], self.class_names, use_meta=True))

    @property
    def needs_shipped_masks(self) -> bool:
        """A component was trained on the lung masks its dataset shipped."""
        return any(c.needs_shipped_masks for c in self.components)

    def with_segmenter(self, segmenter: Segmenter) -> StackBundle:
        """Every component trained on masked images masks with `segmenter`; ConfigError when
        none was (see `Bundle.with_segmenter`)."""
        if not any(c.preprocess.lung_mask for c in self.components):
            raise ConfigError(f"--segmenter: no component of {self.run_dir} was trained on "
                             f"masked images; masking them would change their input")
        return dataclasses.replace(self, components=[
            c.with_segmenter(segmenter) if c.preprocess.lung_mask else c
            for c in self.components])

    def training_hashes(self) -> leakage.TrainingHashes | None:
        """Every component's training hashes together; None if a component has none."""
        parts = [c.training_hashes() for c in self.components]
        return None if any(p is None for p in parts) else leakage.concatenate(parts)
