"""The ensemble bundle: a self-contained run directory that `evaluate` and `predict` load.

Rooms: `runtime` (Bundle, StackBundle, Predictions), `schema` (the JSON types of config.json),
`integrity` (paths and the SHA-256 manifest), `save`, `load` (check then restore), `copy`, and
`segmenter` (the lung segmenter a run may carry).

    RUN/config.json           every flag, plus "bundle": {"format_version", "kind":
                              "ensemble", "strategy", "backbone", "model", "class_names",
                              "preprocess", "tasks", "stacks", "combiner", "meta"}
    RUN/members/stack-<s>/    orbax checkpoint of member group s's variables (member axis first)
    RUN/combiner.json         the fitted rule combiner (and temperature)
    RUN/meta.json | meta.skops  optional meta-classifier (ensembles.combine.meta: JSON for logistic,
                              allowlisted skops for gradient boosting; never pickle)
    RUN/train_hashes.npz      optional (runs since the leakage check): hashes of the training
                              and validation images (data_pipeline.leakage), read on demand

A run trained with `--lung-mask auto` records its segmenter in the section ("segmenter":
{"path": its absolute run folder, "sha256": the digest of its config.json}); loading the
bundle loads that segmenter and refuses one that is missing or changed, and `predict` gives
every image the segmenter's mask before the bundle's preprocessing masks it.
`with_segmenter` swaps in another segmenter (evaluate's and predict's `--segmenter`: a run
trained on a dataset's shipped masks applied to images that have none).

A single model is a one-member ensemble (strategy "single"): its run is the same bundle.

A stack run of `experiments.stack` is a bundle of bundles:

    STACK/config.json         "bundle": {"format_version", "kind": "stack", "class_names",
                              "components": [{"name", "path"}], "meta"}
    STACK/components/<i>/     the pieces of stacked run i (`bundle_pieces`), hard-linked
    STACK/meta.json | meta.skops  the meta-classifier over the components' member outputs

Each component keeps its own preprocessing, so `StackBundle.predict` runs every component
on the raw images through that component's PreprocessConfig, concatenates the member
probabilities in the saved feature layout and applies the meta-classifier. `Bundle.predict`
and `StackBundle.predict` share one signature, which is all `evaluate` and `predict` use.

Integrity: a bundle loads only what it contains, intact.

- Manifest: the "files" entry of the "bundle" section maps every file of the bundle's pieces
  (each file under members/stack-<s>/, combiner.json, the meta file; for a stack, its meta file
  and every file under components/, the components' own config.json included) to its SHA-256
  hex digest. `add_manifest` computes it once those files are written, just before
  config.json, which is written last and atomically: a run has a manifest exactly when it has
  a bundle section. config.json cannot hold its own digest; it is checked instead against the
  schema below and against the checkpoints it describes. A copy (`copy_bundle`,
  `Ensemble.save`, a stack's components) carries config.json and so the manifest, and is
  checked after copying.
- Paths: every path config.json names (stacks[].path, combiner, meta, components[].path, the
  manifest's keys) must be relative, canonical and free of "..", and neither it nor a folder
  on its way may be a symbolic link (the run folder itself may be one); a piece folder holds
  only regular files, exactly those the manifest lists, each with its recorded digest.
- Schema: config.json must be a JSON object whose "bundle" section has exactly the keys and
  types of `ENSEMBLE_SCHEMA` / `STACK_SCHEMA`; preprocess must build a PreprocessConfig, the
  tasks must equal make_tasks', the member groups (`stacks`) must hold every member once, and each checkpoint's
  array shapes (read from its metadata before any array is) must be those of the backbone
  built with the bundle's model options, image size, channels and class count. An ensemble's
  run config ("config", which Ensemble.load rebuilds) must parse and agree with the section.
  combiner.json (`COMBINER_SCHEMA`) and the meta file (ensembles.combine.meta) are validated too.

Anything else -- a missing piece, another format version, a meta file that fails the skops
type check, any of the above -- is refused with a one-line BundleError naming the file, which
the CLIs print as `error: ...` (exit 2). The digests catch corrupted or edited files, not a
forger who also rewrites config.json's manifest: that would take a signature.
"""

from __future__ import annotations

from ensembles.bundle.copy import bundle_pieces, copy_bundle
from ensembles.bundle.integrity import (
    COMBINER_FILE,
    COMPONENTS_DIR,
    CONFIG_FILE,
    add_manifest,
    manifest,
)
from ensembles.bundle.load import load_bundle
from ensembles.bundle.runtime import (
    Bundle,
    Predictions,
    StackBundle,
    concat_predictions,
    model_order,
)
from ensembles.bundle.save import bundle_section, save_members, stack_section
from ensembles.bundle.schema import BundleError

__all__ = ["COMBINER_FILE", "COMPONENTS_DIR", "CONFIG_FILE", "Bundle", "BundleError",
           "Predictions", "StackBundle", "add_manifest", "bundle_pieces", "bundle_section",
           "concat_predictions", "copy_bundle", "load_bundle", "manifest",
           "model_order", "save_members", "stack_section"]
