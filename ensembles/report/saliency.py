"""Grad-CAM for a loaded ensemble: a map per member and one for the ensemble's decision.

Member maps (backbones.gradcam, the gradient of the member's logit) explain each member's own
positive class: OvA member k its column 1 (class k), OvO member (i, j) its column 0 (class
i), cascade stage 1 its column 1 (sick) and stage 2 its predicted sick type, a single model
its predicted class.

The combined map explains the ensemble's decision c (the rule combiner's `decide`):

- OvA and cascade ("gradient"): the combiner's probability P(c) is written in jnp (OvA: the
  normalised positive scores; cascade: the product rule after the threshold mapping), and its
  gradient is taken through all members at once. Each member's feature map contributes
  sum_k alpha_k A_k (alpha: spatial mean of dP(c)/dA); the contributions add up before the
  ReLU, as if the members' feature maps were one map with M x C channels.
- OvO ("weighted members"): votes are not differentiable. The K-1 members that involve c each
  explain c (their column for c) and are weighted by their probability of c, normalised to
  sum 1, so members that voted for c weigh more than those that voted against it. The same
  rule serves decision="coupling".
- single ("gradient"): the member's map for c (its logit, as backbones.gradcam).

The meta-classifier is not differentiable and not explained: maps follow the rule's decision.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import softmax

import backbones
from backbones.gradcam import class_map, features_and_logits, gradcam_maps, linear_map
from ensembles.bundle import Bundle
from ensembles.combine.tasks import Tasks, relabel

METHODS = {"single": "gradient", "ova": "gradient", "cascade": "gradient",
           "ovo": "weighted members"}


@dataclasses.dataclass(frozen=True)
class EnsembleCams:
    """Raw Grad-CAM maps (>= 0, at the feature-map size h x w) of one batch of B images."""

    member_maps: np.ndarray     # [M, B, h, w] member m's map of its own class
    member_classes: np.ndarray  # [M, B] the member output column each member map explains
    combined: np.ndarray        # [B, h, w] the map of the ensemble's decision
    decisions: np.ndarray       # [B] the rule's decisions (indices into class_names)
    proba: np.ndarray           # [B, K] the rule's class probabilities
    method: str                 # how `combined` was made: "gradient" | "weighted members"


def member_columns(tasks: Tasks) -> np.ndarray:
    """Per member, the output column its map explains; -1: its own argmax."""
    if tasks.strategy == "ova":
        return np.ones(tasks.num_members, np.int32)
    if tasks.strategy == "ovo":
        return np.zeros(tasks.num_members, np.int32)
    if tasks.strategy == "cascade":
        return np.array([1, -1], np.int32)
    return np.full(tasks.num_members, -1, np.int32)


def combined_proba(strategy: str, probs: list[jax.Array], *, healthy: int | None = None,
                   threshold: float = 0.5) -> jax.Array:
    """The rule combiner's [B, K] probabilities in jnp, from member probabilities in member
    order (OvA and cascade; the same arithmetic as ensembles.combine.combiners)."""
    if strategy == "ova":
        s = jnp.stack([p[:, 1] for p in probs], axis=1)
        total = s.sum(axis=1, keepdims=True)
        return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / s.shape[1])
    if strategy == "cascade":
        s, q = probs[0][:, 1], probs[1]
        s = jnp.where(s < threshold, 0.5 * s / threshold,
                      0.5 + 0.5 * (s - threshold) / (1 - threshold))
        return jnp.insert(s[:, None] * q, healthy, 1.0 - s, axis=1)
    raise ValueError(f"no differentiable combiner for {strategy!r}")


@functools.lru_cache(maxsize=16)
def _member_pass(model, layer: str):
    """jit(vmap over members) of gradcam_maps: (maps, classes, logits, features) [M_s, ...]."""
    return jax.jit(jax.vmap(lambda v, x, c: gradcam_maps(model, v, x, c, layer),
                            in_axes=(0, None, 0)))


@functools.lru_cache(maxsize=16)
def _class_pass(model, layer: str):
    """jit(vmap over members) of class_map given the members' features [M_s, B, h, w, C]."""
    return jax.jit(jax.vmap(lambda v, x, f, c: class_map(model, v, x, f, c, layer),
                            in_axes=(0, None, 0, 0)))


@functools.lru_cache(maxsize=16)
def _gradient_pass(models: tuple, layer: str, members: tuple[tuple[int, ...], ...],
                   strategy: str, healthy: int | None, threshold: float):
    """jit of (variables per member group, images, features per member group, decisions [B]) -> (ReLU of
    the members' summed contributions to dP(decision)/dA [B, h, w], P [B, K])."""

    def run(variables, images, features, decisions):
        def prob(feats):
            logits = {}
            for model, idx, v, f in zip(models, members, variables, feats, strict=True):
                z = jax.vmap(lambda v, f, model=model:
                             features_and_logits(model, v, images, layer, f)[0])(v, f)
                logits.update({m: z[i] for i, m in enumerate(idx)})
            probs = [jax.nn.softmax(logits[m].astype(jnp.float32), axis=-1)
                     for m in sorted(logits)]
            p = combined_proba(strategy, probs, healthy=healthy, threshold=threshold)
            return jnp.take_along_axis(p, decisions[:, None], axis=1).sum(), p

        grads, p = jax.grad(prob, has_aux=True)(features)
        total = sum(jax.vmap(linear_map)(f, g).sum(axis=0)
                    for f, g in zip(features, grads, strict=True))
        return jax.nn.relu(total), p

    return jax.jit(run)


def ensemble_gradcam(bundle: Bundle, images: np.ndarray) -> EnsembleCams:
    """Member and combined Grad-CAM maps for a batch of preprocessed inputs [B, S, S, C]
    (what bundle.preprocess makes of the raw images)."""
    if not isinstance(bundle, Bundle):
        raise ValueError("Grad-CAM needs an ensemble or single-model run, not a stack run "
                         "(its meta-classifier is not differentiable)")
    layer = backbones.gradcam_layer(bundle.backbone)
    models = [backbones.create(bundle.backbone, num_classes=s.num_classes,
                               **bundle.model_options) for s in bundle.groups]
    x = jnp.asarray(images, jnp.float32)
    b, m_total = x.shape[0], bundle.tasks.num_members
    columns = member_columns(bundle.tasks)
    maps, classes = [None] * m_total, [None] * m_total
    logits, features = [None] * m_total, []
    for model, stack, v in zip(models, bundle.groups, bundle.variables, strict=True):
        c = jnp.asarray(np.repeat(columns[list(stack.members), None], b, axis=1))
        out = _member_pass(model, layer)(v, x, c)
        features.append(out[3])
        for i, m in enumerate(stack.members):
            maps[m], classes[m], logits[m] = (np.asarray(o[i]) for o in out[:3])
    probs = [softmax(z.astype(np.float64), axis=-1) for z in logits]   # as Bundle.member_outputs
    proba, decisions = bundle.combine(probs), np.asarray(bundle.decide(probs))
    method = METHODS[bundle.tasks.strategy]
    if bundle.tasks.strategy == "single":
        combined = np.asarray(_class_pass(models[0], layer)(
            bundle.variables[0], x, features[0], jnp.asarray(decisions[None], jnp.int32))[0])
    elif method == "gradient":
        run = _gradient_pass(tuple(models), layer, tuple(s.members for s in bundle.groups),
                             bundle.tasks.strategy, bundle.tasks.healthy,
                             float(getattr(bundle.combiner, "threshold_", 0.5)))
        combined = np.asarray(run(bundle.variables, x, features,
                                  jnp.asarray(decisions, jnp.int32))[0])
    else:
        combined = _weighted_members(bundle, models, layer, x, features, probs, decisions)
    return EnsembleCams(np.stack(maps), np.stack(classes), combined, decisions, proba, method)


def _weighted_members(bundle: Bundle, models, layer: str, x, features, probs, decisions
                      ) -> np.ndarray:
    """OvO: the maps of c by the members that involve c, weighted by their P(c)."""
    table = bundle.tasks.table                         # [M, K]: 0 = class i, 1 = class j, -1
    column = relabel(table, decisions)                 # [M, B] each member's column for c
    weight = np.where(column >= 0, np.take_along_axis(
        np.stack(probs), np.maximum(column, 0)[..., None], axis=2)[..., 0], 0.0)
    combined = np.zeros((x.shape[0], *features[0].shape[2:4]))
    for model, stack, v, f in zip(models, bundle.groups, bundle.variables, features,
                                  strict=True):
        idx = list(stack.members)
        cams = np.asarray(_class_pass(model, layer)(v, x, f, jnp.asarray(
            np.maximum(column[idx], 0), jnp.int32)))
        combined += np.einsum("mb,mbhw->bhw", weight[idx], cams)
    return combined / weight.sum(axis=0)[:, None, None]
