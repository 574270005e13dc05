"""A run bundle loads only what it contains, intact (issue 10, section 2).

One tiny OvA run with a gradient-boosting meta (meta.skops) and a stack of it, then one copy
per tampering: paths leading out of the run (absolute, "..", symlinks), changed, extra or
missing files (a 1-bit flip included), config.json failing the schema or disagreeing with the
checkpoints, malformed combiner and skops files. Each ends in exactly one line of BundleError
naming the file (the CLIs: `error: ...`, exit 2, no traceback), never in other weights loaded.
Cases marked "+manifest" also rewrite the manifest, as a forger would, to reach the checks
behind the digests. Copies made by Ensemble.save, copy_bundle and stacking still verify.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from data_pipeline.preprocess import PreprocessConfig
from ensembles import Ensemble, Stack
from ensembles.bundle import (
    Bundle,
    BundleError,
    StackBundle,
    add_manifest,
    bundle_pieces,
    copy_bundle,
    load_bundle,
    manifest,
)
from ensembles.bundle.schema import MANIFEST_KEY, PREPROCESS_TYPES
from ensembles.combine.tasks import make_tasks
from experiments import evaluate, predict

DIGEST = "does not match its SHA-256 digest in {config}: the file changed after the run was " \
         "saved (corrupt or tampered)"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def run(base, trains) -> Path:
    return Ensemble("ova", backbone="simple_cnn", image_size=16, count=64, width=0.25, epochs=1,
                    batch_size=8, progress=False, n_bootstrap=0, meta="gboost",
                    cache_dir=str(base / "tfds")).fit(out=base / "run").run_dir_


@pytest.fixture(scope="module")
def other(base, run) -> Path:
    """A valid bundle with other weights: a real copy of the run, one weight file changed and
    the manifest recorded again."""
    other = shutil.copytree(run, base / "other")
    _flip(_largest(other))
    _rehash(other)
    load_bundle(other)
    return other


@pytest.fixture(scope="module")
def stacked(base, run) -> Path:
    Stack([run, run]).fit(base / "stack")
    return base / "stack"


# -- tampering helpers ----------------------------------------------------------------------
def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _write_config(d: Path, config) -> None:
    (d / "config.json").write_text(json.dumps(config))


def _edit(fn: Callable[[dict], object]) -> Callable:
    def tamper(d: Path, other: Path):
        config = _config(d)
        fn(config)
        _write_config(d, config)
    return tamper


def _rehash(d: Path) -> None:
    """Record the manifest again (a forger's consistent bundle), to reach the next checks."""
    config = _config(d)
    config["bundle"] = add_manifest(d, config["bundle"])
    _write_config(d, config)


def _then_rehash(tamper: Callable) -> Callable:
    def both(d: Path, other: Path):
        result = tamper(d, other)
        _rehash(d)
        return result
    return both


def _largest(d: Path) -> Path:
    files = [p for p in (d / "members" / "stack-0").rglob("*") if p.is_file()]
    return max(files, key=lambda p: (p.stat().st_size, str(p)))


def _flip(path: Path, byte: int | None = None) -> Path:
    """Flip one bit of a file (a real copy: never a hard link of the module's run)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if byte is None else byte] ^= 1
    path.unlink()
    path.write_bytes(bytes(data))
    return path


def _symlink(path: Path, target: Path) -> Path:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)
    return path


def _skops_doc(path: Path) -> dict:
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


def _skops_edit(fn: Callable[[dict], object]) -> Callable:
    def tamper(d: Path, other: Path):
        doc = _skops_doc(d / "meta.skops")
        fn(doc)
        (d / "meta.skops").unlink()
        sio.dump(doc, d / "meta.skops")
    return tamper


def _skops_foreign(d: Path, other: Path) -> None:
    doc = _skops_doc(d / "meta.skops")
    doc["estimator"] = KNeighborsClassifier(1, algorithm="kd_tree").fit(np.eye(8),
                                                                        np.arange(8) % 4)
    (d / "meta.skops").unlink()
    sio.dump(doc, d / "meta.skops")


def _drop_schema(d: Path, other: Path) -> None:
    src, tmp = d / "meta.skops", d / "meta.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for item in zin.infolist():
            if item.filename != "schema.json":
                zout.writestr(item, zin.read(item))
    tmp.replace(src)


def _five_classes(config: dict) -> None:
    """A fifth class, with the tasks and stack entry that go with it: consistent config,
    but the checkpoint holds 4 members."""
    b = config["bundle"]
    b["class_names"].append("lung_opacity")
    t = make_tasks("ova", b["class_names"])
    b["tasks"] = {"names": list(t.names), "num_classes": list(t.num_classes),
                  "table": t.table.tolist(), "healthy": None}
    b["stacks"][0]["members"] = list(range(5))


def _replace_tree(path: Path, src: Path) -> None:
    shutil.rmtree(path)
    shutil.copytree(src, path)


def _empty(path: Path) -> None:
    shutil.rmtree(path)
    path.mkdir()


KNOWN_PREPROCESS = ", ".join(f.name for f in dataclasses.fields(PreprocessConfig))
SHAPES = "simple_cnn {{'head': 'imagenet', 'width': 0.25}}, {size} px, {ch} channel(s), " \
         "{c} classes, {m} member(s)"


def _fit(d: Path, what: str, detail: str) -> str:
    return (f"{d}/members/stack-0 does not fit the model {d}/config.json describes ({what}): "
            f"{detail}")


# (id, tamper(d, other) -> optional file, expected(d, other, file) -> the whole message)
CASES: list[tuple[str, Callable, Callable]] = [
    # paths out of the run
    ("stacks-path-absolute",
     _edit(lambda c: c["bundle"]["stacks"][0].update(path="/tmp/other/members/stack-0")),
     lambda d, o, f: f"{d}/config.json: bundle.stacks[0].path '/tmp/other/members/stack-0' "
                     f"points outside the run folder"),
    ("stacks-path-dotdot",
     _edit(lambda c: c["bundle"]["stacks"][0].update(path="../other/members/stack-0")),
     lambda d, o, f: f"{d}/config.json: bundle.stacks[0].path '../other/members/stack-0' "
                     f"points outside the run folder"),
    ("stacks-path-not-canonical",
     _edit(lambda c: c["bundle"]["stacks"][0].update(path="./members/stack-0")),
     lambda d, o, f: f"{d}/config.json: bundle.stacks[0].path './members/stack-0' is not a "
                     f"canonical path of a bundle piece"),
    ("member-folder-symlink",
     lambda d, o: _symlink(d / "members" / "stack-0", o / "members" / "stack-0"),
     lambda d, o, f: f"{f} is a symbolic link: a bundle holds its own files, so "
                     f"bundle.stacks[0].path may not lead out of it"),
    ("members-symlink", lambda d, o: _symlink(d / "members", o / "members"),
     lambda d, o, f: f"{f} is a symbolic link: a bundle holds its own files, so "
                     f"bundle.stacks[0].path may not lead out of it"),
    ("checkpoint-file-symlink",
     lambda d, o: _symlink(_largest(d), o / _largest(d).relative_to(d)),
     lambda d, o, f: f"{f} is a symbolic link: a bundle holds its own files"),
    ("combiner-absolute", _edit(lambda c: c["bundle"].update(combiner="/etc/hostname")),
     lambda d, o, f: f"{d}/config.json: bundle.combiner '/etc/hostname' points outside the "
                     f"run folder"),
    ("combiner-dotdot", _edit(lambda c: c["bundle"].update(combiner="../other/combiner.json")),
     lambda d, o, f: f"{d}/config.json: bundle.combiner '../other/combiner.json' points "
                     f"outside the run folder"),
    ("combiner-symlink", lambda d, o: _symlink(d / "combiner.json", o / "combiner.json"),
     lambda d, o, f: f"{f} is a symbolic link: a bundle holds its own files, so "
                     f"bundle.combiner may not lead out of it"),
    ("meta-outside", _edit(lambda c: c["bundle"].update(meta="../other/meta.skops")),
     lambda d, o, f: f"{d}/config.json: bundle.meta '../other/meta.skops' must be one of "
                     f"meta.json, meta.skops"),
    ("config-symlink", lambda d, o: _symlink(d / "config.json", o / "config.json"),
     lambda d, o, f: f"{f} is a symbolic link: a bundle holds its own files"),
    ("manifest-entry-dotdot",
     _edit(lambda c: c["bundle"][MANIFEST_KEY].update({"../x": "0" * 64})),
     lambda d, o, f: f"{d}/config.json: a manifest entry '../x' points outside the run folder"),
    # changed, extra, missing files
    ("bit-flip-checkpoint", lambda d, o: _flip(_largest(d)),
     lambda d, o, f: f"{f} " + DIGEST.format(config=d / "config.json")),
    ("bit-flip-checkpoint-metadata",
     lambda d, o: _flip(d / "members" / "stack-0" / "_METADATA", 40),
     lambda d, o, f: f"{f} " + DIGEST.format(config=d / "config.json")),
    ("bit-flip-skops", lambda d, o: _flip(d / "meta.skops"),
     lambda d, o, f: f"{f} " + DIGEST.format(config=d / "config.json")),
    ("combiner-changed",
     lambda d, o: (d / "combiner.json").write_text('{"rule": {"strategy": "ova"}}') and None,
     lambda d, o, f: f"{d}/combiner.json " + DIGEST.format(config=d / "config.json")),
    ("checkpoint-of-other-weights",
     lambda d, o: _replace_tree(d / "members" / "stack-0", o / "members" / "stack-0"),
     lambda d, o, f: f"{_largest(d)} " + DIGEST.format(config=d / "config.json")),
    ("extra-file", lambda d, o: (d / "members" / "stack-0" / "extra.bin").write_bytes(b"x"),
     lambda d, o, f: f"{d}/members/stack-0/extra.bin is not in the manifest of "
                     f"{d}/config.json: the bundle was changed after it was saved"),
    ("file-deleted", lambda d, o: (_largest(d).unlink(), _largest(o))[1],
     lambda d, o, f: f"incomplete run: {d / f.relative_to(o)} is missing (listed in the "
                     f"manifest of {d}/config.json)"),
    ("empty-member-folder", lambda d, o: _empty(d / "members" / "stack-0"),
     lambda d, o, f: f"incomplete run: member checkpoint {d}/members/stack-0 is empty"),
    ("manifest-removed", _edit(lambda c: c["bundle"].pop(MANIFEST_KEY)),
     lambda d, o, f: f"{d}/config.json: bundle.files (the SHA-256 manifest of the bundle's "
                     f"files) is missing: the run predates digests or was edited"),
    # config.json against the schema
    ("config-is-a-list", lambda d, o: (d / "config.json").write_text("[1, 2]") and None,
     lambda d, o, f: f"{d}/config.json must hold a JSON object, found a list ([1, 2])"),
    ("config-not-json", lambda d, o: (d / "config.json").write_text("{") and None,
     lambda d, o, f: f"{d}/config.json is not a valid JSON file (Expecting property name "
                     f"enclosed in double quotes)"),
    ("bundle-is-a-list", _edit(lambda c: c.update(bundle=[1])),
     lambda d, o, f: f"{d}/config.json: bundle must be a JSON object, found a list ([1])"),
    ("no-tasks", _edit(lambda c: c["bundle"].pop("tasks")),
     lambda d, o, f: f"{d}/config.json: bundle.tasks is missing"),
    ("no-stacks", _edit(lambda c: c["bundle"].pop("stacks")),
     lambda d, o, f: f"{d}/config.json: bundle.stacks is missing"),
    ("stacks-empty", _edit(lambda c: c["bundle"].update(stacks=[])),
     lambda d, o, f: f"{d}/config.json: bundle.stacks is empty"),
    ("unknown-bundle-key", _edit(lambda c: c["bundle"].update(weights="elsewhere")),
     lambda d, o, f: f"{d}/config.json: bundle has unknown key 'weights' (known: "
                     f"format_version, kind, strategy, backbone, model, class_names, "
                     f"preprocess, tasks, stacks, combiner, meta, train_hashes, segmenter, files)"),
    ("unknown-preprocess-key", _edit(lambda c: c["bundle"]["preprocess"].update(gamma=2)),
     lambda d, o, f: f"{d}/config.json: bundle.preprocess has unknown key 'gamma' (known: "
                     f"{KNOWN_PREPROCESS})"),
    ("preprocess-key-missing",
     _edit(lambda c: c["bundle"]["preprocess"].pop("normalization")),
     lambda d, o, f: f"{d}/config.json: bundle.preprocess.normalization is missing"),
    ("preprocess-invalid",
     _edit(lambda c: c["bundle"]["preprocess"].update(normalization="caffe")),
     lambda d, o, f: f"{d}/config.json: bundle.preprocess is invalid (normalization 'caffe' "
                     f"is an ImageNet RGB preset and needs channels=3, got channels=1)"),
    ("image-size-a-string",
     _edit(lambda c: c["bundle"]["preprocess"].update(image_size="16")),
     lambda d, o, f: f"{d}/config.json: bundle.preprocess.image_size must be an integer, "
                     f"found a string (\"16\")"),
    ("class-names-wrong-type", _edit(lambda c: c["bundle"].update(class_names=[1, 2])),
     lambda d, o, f: f"{d}/config.json: bundle.class_names[0] must be a string, found a "
                     f"number (1)"),
    ("manifest-digest-malformed",
     _edit(lambda c: c["bundle"][MANIFEST_KEY].update({"combiner.json": "abc"})),
     lambda d, o, f: f"{d}/config.json: bundle.files['combiner.json'] must be a SHA-256 hex "
                     f"digest, found a string (\"abc\")"),
    ("unknown-backbone", _edit(lambda c: c["bundle"].update(backbone="nope")),
     lambda d, o, f: f"{d}/config.json: bundle.backbone 'nope' is not a known backbone"),
    ("tasks-disagree", _edit(lambda c: c["bundle"]["class_names"].append("lung_opacity")),
     lambda d, o, f: f"{d}/config.json: bundle.tasks.names differs from the ova tasks over "
                     f"bundle.class_names"),
    ("stack-members-out-of-range",
     _edit(lambda c: c["bundle"]["stacks"][0].update(members=[0, 1, 2, 7])),
     lambda d, o, f: f"{d}/config.json: bundle.stacks[0].members [0, 1, 2, 7] must be member "
                     f"indices in [0, 4)"),
    ("stack-class-count", _edit(lambda c: c["bundle"]["stacks"][0].update(num_classes=3)),
     lambda d, o, f: f"{d}/config.json: bundle.stacks[0].num_classes 3 disagrees with its "
                     f"members' class counts [2]"),
    # config.json against the checkpoint
    ("backbone-disagrees", _edit(lambda c: c["bundle"].update(backbone="complex_cnn")),
     lambda d, o, f: _fit(d, SHAPES.format(size=16, ch=1, c=2, m=4).replace(
         "simple_cnn", "complex_cnn"), "params/head/fc1/bias is ((4, 128), 'float32'), the "
                                       "model needs ((4, 512), 'float32')")),
    ("image-size-disagrees",
     _edit(lambda c: c["bundle"]["preprocess"].update(image_size=32)),
     lambda d, o, f: _fit(d, SHAPES.format(size=32, ch=1, c=2, m=4),
                          "params/head/fc1/kernel is ((4, 256, 128), 'float32'), the model "
                          "needs ((4, 1024, 128), 'float32')")),
    ("channels-disagree", _edit(lambda c: c["bundle"]["preprocess"].update(channels=3)),
     lambda d, o, f: _fit(d, SHAPES.format(size=16, ch=3, c=2, m=4),
                          "params/block1_conv1/kernel is ((4, 3, 3, 1, 8), 'float32'), the "
                          "model needs ((4, 3, 3, 3, 8), 'float32')")),
    ("class-count-disagrees", _edit(_five_classes),
     lambda d, o, f: _fit(d, SHAPES.format(size=16, ch=1, c=2, m=5),
                          "params/block1_conv1/bias is ((4, 8), 'float32'), the model needs "
                          "((5, 8), 'float32')")),
    ("run-config-missing", _edit(lambda c: c.pop("config")),
     lambda d, o, f: f"{d}/config.json: the run config (\"config\") is missing or not an "
                     f"object"),
    ("run-config-disagrees", _edit(lambda c: c["config"]["data"].update(image_size=32)),
     lambda d, o, f: f"{d}/config.json: bundle.preprocess.image_size 16 disagrees with the run "
                     f"config's data.image_size 32"),
    # behind the digests (+manifest): combiner, skops and checkpoint contents
    ("+manifest-combiner-not-json",
     _then_rehash(lambda d, o: (d / "combiner.json").write_text("{") and None),
     lambda d, o, f: f"{d}/combiner.json is not a valid combiner file (Expecting property "
                     f"name enclosed in double quotes)"),
    ("+manifest-combiner-a-list",
     _then_rehash(lambda d, o: (d / "combiner.json").write_text("[]") and None),
     lambda d, o, f: f"{d}/combiner.json: the combiner must be a JSON object, found a list "
                     f"([])"),
    ("+manifest-combiner-other-strategy",
     _then_rehash(lambda d, o: (d / "combiner.json").write_text(
         '{"rule": {"strategy": "ovo"}}') and None),
     lambda d, o, f: f"{d}/combiner.json: not a combiner of these tasks (combiner is for "
                     f"'ovo', tasks are 'ova')"),
    ("+manifest-skops-without-params", _then_rehash(_skops_edit(lambda doc: doc.pop("params"))),
     lambda d, o, f: f"{d}/meta.skops: the saved meta-classifier has no 'params'"),
    ("+manifest-skops-unknown-parameter",
     _then_rehash(_skops_edit(lambda doc: doc["params"].update(gamma=1))),
     lambda d, o, f: f"{d}/meta.skops: unknown meta-classifier parameter(s) 'gamma'; known: "
                     f"C, max_iter, model, random_state"),
    ("+manifest-skops-without-schema", _then_rehash(_drop_schema),
     lambda d, o, f: f"{d}/meta.skops: not a skops file: its schema.json is missing"),
    ("+manifest-skops-foreign-types", _then_rehash(_skops_foreign),
     lambda d, o, f: f"{d}/meta.skops: refusing to load types outside the gradient-boosting "
                     f"meta-classifier allowlist: sklearn.metrics._dist_metrics."
                     f"EuclideanDistance64, sklearn.neighbors._kd_tree.KDTree"),
    ("+manifest-checkpoint-metadata-flip",
     _then_rehash(lambda d, o: _flip(d / "members" / "stack-0" / "_METADATA", 40)),
     lambda d, o, f: f"{d}/members/stack-0: not a readable member checkpoint (its metadata "
                     f"describes no params)"),
    ("+manifest-empty-member-folder",
     _then_rehash(lambda d, o: _empty(d / "members" / "stack-0")),
     lambda d, o, f: f"incomplete run: member checkpoint {d}/members/stack-0 is empty"),
]


def _refusal(run_dir: Path) -> str:
    with pytest.raises(BundleError) as caught:
        load_bundle(run_dir)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("tamper,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tampered_ensemble_is_refused_naming_the_file(run, other, tmp_path, tamper, expected):
    d = shutil.copytree(run, tmp_path / "run", symlinks=True)
    file = tamper(d, other)
    assert _refusal(d) == expected(d, other, file)


STACK_CASES: list[tuple[str, Callable, Callable]] = [
    ("component-path-absolute",
     _edit(lambda c: c["bundle"]["components"][0].update(path="/tmp/run")),
     lambda d, o, f: f"{d}/config.json: bundle.components[0].path '/tmp/run' points outside "
                     f"the run folder"),
    ("component-symlink", lambda d, o: _symlink(d / "components" / "0", o),
     lambda d, o, f: f"{f} is a symbolic link: a bundle holds its own files, so "
                     f"bundle.components[0].path may not lead out of it"),
    ("component-replaced-by-another-valid-run",
     lambda d, o: [copy_bundle(o, d / "components" / "1", bundle_pieces(o))
                   for _ in [shutil.rmtree(d / "components" / "1")]] and None,
     lambda d, o, f: f"{d}/components/1/config.json " + DIGEST.format(
         config=d / "config.json")),
    ("component-bit-flip",
     lambda d, o: _flip(_largest(d / "components" / "1")),
     lambda d, o, f: f"{f} " + DIGEST.format(config=d / "components" / "1" / "config.json")),
    ("component-config-edited",
     lambda d, o: _edit(lambda c: c["bundle"]["preprocess"].update(image_size=32))(
         d / "components" / "0", o),
     lambda d, o, f: _fit(d / "components" / "0", SHAPES.format(size=32, ch=1, c=2, m=4),
                          "params/head/fc1/kernel is ((4, 256, 128), 'float32'), the model "
                          "needs ((4, 1024, 128), 'float32')")),
    ("stack-meta-changed", lambda d, o: (d / "meta.json").write_text(
        (d / "meta.json").read_text().replace('"C": 1.0', '"C": 2.0')) and None,
     lambda d, o, f: f"{d}/meta.json " + DIGEST.format(config=d / "config.json")),
    ("stack-meta-outside", _edit(lambda c: c["bundle"].update(meta="/etc/hostname")),
     lambda d, o, f: f"{d}/config.json: bundle.meta '/etc/hostname' must be one of "
                     f"meta.json, meta.skops"),
    ("stack-config-is-a-list", lambda d, o: (d / "config.json").write_text("[]") and None,
     lambda d, o, f: f"{d}/config.json must hold a JSON object, found a list ([])"),
    ("stack-extra-file", lambda d, o: (d / "components" / "0" / "outputs.npz").write_bytes(
        b"x") and None,
     lambda d, o, f: f"{d}/components/0/outputs.npz is not in the manifest of "
                     f"{d}/config.json: the bundle was changed after it was saved"),
    ("+manifest-stack-meta-unknown-parameter", _then_rehash(
        lambda d, o: (d / "meta.json").write_text((d / "meta.json").read_text().replace(
            '"C": 1.0', '"C": 1.0, "gamma": 1')) and None),
     lambda d, o, f: f"{d}/meta.json: unknown meta-classifier parameter(s) 'gamma'; known: "
                     f"C, max_iter, model, random_state"),
]


@pytest.mark.parametrize("tamper,expected", [c[1:] for c in STACK_CASES],
                         ids=[c[0] for c in STACK_CASES])
def test_tampered_stack_is_refused_naming_the_file(stacked, other, tmp_path, tamper, expected):
    d = shutil.copytree(stacked, tmp_path / "stack", symlinks=True)
    file = tamper(d, other)
    assert _refusal(d) == expected(d, other, file)


# -- the manifest, and copies that still verify ---------------------------------------------
def test_manifest_lists_every_file_of_the_pieces(run, stacked):
    section = _config(run)["bundle"]
    files = section[MANIFEST_KEY]
    on_disk = sorted(p.relative_to(run).as_posix() for piece in ("members", "combiner.json",
                                                                 "meta.skops",
                                                                 "train_hashes.npz")
                     for p in ([run / piece] if (run / piece).is_file()
                               else (run / piece).rglob("*")) if p.is_file())
    assert sorted(files) == on_disk and "config.json" not in files
    assert files == manifest(run, ["combiner.json", "members/stack-0", "meta.skops",
                                   "train_hashes.npz"])
    stack_files = _config(stacked)["bundle"][MANIFEST_KEY]
    assert stack_files["components/0/config.json"] == stack_files["components/1/config.json"]
    assert {f.removeprefix("components/0/") for f in stack_files
            if f.startswith("components/0/")} == {"config.json", *files}
    assert "meta.json" in stack_files
    # every PreprocessConfig field has a type in the schema
    assert set(PREPROCESS_TYPES) == {f.name for f in dataclasses.fields(PreprocessConfig)}


def test_copies_verify(run, stacked, tmp_path):
    ens = Ensemble.load(run)
    saved = ens.save(tmp_path / "saved")               # hard links where possible
    assert isinstance(load_bundle(saved), Bundle)
    assert Ensemble.load(saved).classes_ == ens.classes_
    copy_bundle(run, tmp_path / "copy", bundle_pieces(run))
    assert _config(tmp_path / "copy")["bundle"] == _config(run)["bundle"]
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 20), np.uint8)
    np.testing.assert_array_equal(Ensemble.load(tmp_path / "copy").predict_proba(images),
                                  ens.predict_proba(images))
    bundle = load_bundle(stacked)
    assert isinstance(bundle, StackBundle) and len(bundle.components) == 2
    for i in range(2):                                 # each component verifies on its own
        assert [str(p) for p in bundle_pieces(stacked / "components" / str(i))] == [
            "config.json", "combiner.json", "members/stack-0", "meta.skops",
            "train_hashes.npz"]


def test_a_copy_of_a_tampered_run_is_refused_before_a_write(run, tmp_path):
    d = shutil.copytree(run, tmp_path / "run")
    ens = Ensemble.load(d)
    flipped = _flip(_largest(d))
    message = DIGEST.format(config=d / "config.json")
    with pytest.raises(BundleError, match="^" + str(flipped) + " does not match"):
        ens.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(BundleError) as caught:
        Stack([run, d]).fit(tmp_path / "stack")
    assert str(caught.value) == f"{flipped} {message}"
    assert not (tmp_path / "stack").exists()


def test_copy_bundle_checks_the_copy(run, tmp_path):
    """A symlinked piece is copied as a link, and the copy is refused."""
    d = shutil.copytree(run, tmp_path / "run")
    (d / "combiner.json").unlink()
    (d / "combiner.json").symlink_to(run / "combiner.json")
    with pytest.raises(BundleError, match="combiner.json is a symbolic link"):
        copy_bundle(d, tmp_path / "copy", ["config.json", "combiner.json", "members/stack-0",
                                           "meta.skops"])


# -- the CLIs: error: ..., exit 2, no traceback ----------------------------------------------
@pytest.fixture(scope="module")
def images(base) -> Path:
    folder = base / "images"
    folder.mkdir()
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(folder / "a.png")
    return folder


def _one_error_line(capsys, path: Path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(path) in lines[0], err
    return lines[0]


def test_clis_refuse_tampered_runs(run, stacked, other, images, tmp_path, capsys):
    flipped = shutil.copytree(run, tmp_path / "flipped")
    file = _flip(_largest(flipped))
    assert evaluate.main(["--run", str(flipped), "--dataset", "synthetic_cxr",
                          "--n-bootstrap", "0"]) == 2
    assert _one_error_line(capsys, file) == (
        f"error: {file} " + DIGEST.format(config=flipped / "config.json"))
    outside = shutil.copytree(run, tmp_path / "outside")
    _edit(lambda c: c["bundle"]["stacks"][0].update(path=str(other / "members/stack-0")))(
        outside, other)
    assert predict.main(["--run", str(outside), str(images)]) == 2
    assert _one_error_line(capsys, outside / "config.json") == (
        f"error: {outside}/config.json: bundle.stacks[0].path "
        f"'{other}/members/stack-0' points outside the run folder")
    listed = shutil.copytree(stacked, tmp_path / "stack")
    (listed / "config.json").write_text("[]")
    assert predict.main(["--run", str(listed), str(images)]) == 2
    assert _one_error_line(capsys, listed / "config.json") == (
        f"error: {listed}/config.json must hold a JSON object, found a list ([])")
    skops = shutil.copytree(run, tmp_path / "skops")
    _then_rehash(_skops_edit(lambda doc: doc.pop("params")))(skops, other)
    assert evaluate.main(["--run", str(skops), "--dataset", "synthetic_cxr"]) == 2
    assert _one_error_line(capsys, skops / "meta.skops") == (
        f"error: {skops}/meta.skops: the saved meta-classifier has no 'params'")
    # the untouched run still predicts
    assert predict.main(["--run", str(run), str(images)]) == 0
