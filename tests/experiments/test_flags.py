"""Every numeric flag is checked with its range before anything is written; a run too big for
memory is refused before it compiles; a one-epoch run with a long warm-up still trains."""

from __future__ import annotations

import json

import pytest

from ensembles.training import build
from experiments import ensemble_cli

TINY = ["--image-size", "16", "--count", "64", "--width", "0.25", "--batch-size", "8",
        "--n-bootstrap", "0", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "lr must be in (0, 10]; got -1.0"),
    (["--label-smoothing", "2"], "label_smoothing must be in [0, 1); got 2.0"),
    (["--clip-norm", "-1"], "clip_norm must be > 0 (or unset); got -1.0"),
    (["--weight-decay", "-10"], "weight_decay must be >= 0; got -10.0"),
    (["--warmup-epochs", "-5"], "warmup_epochs must be >= 0; got -5.0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1 (resume needs one); got 0"),
    (["--early-stopping-patience", "-1"], "early_stopping_patience must be >= 0"),
    (["--target-sensitivity", "1.5"], "target_sensitivity must be in (0, 1]"),
    (["--image-size", "4096"], "image_size must be in [8, 2048] pixels; got 4096"),
    (["--width", "0"], "width must be > 0; got 0.0"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "100000"], "fewer than one batch of 100000"),
    (["--members", "stacked"], "one training step needs about"),
])
def test_bad_values_are_refused_before_any_write(flags, message, tmp_path, cache, capsys,
                                                 monkeypatch):
    monkeypatch.setattr(build, "available_memory_bytes", lambda: 2**20)  # 1 MiB: too small
    out = tmp_path / "run"
    code = ensemble_cli.main("ova", "", [*TINY, *flags, "--out", str(out), "--cache-dir", cache])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


def test_the_memory_estimate_grows_with_batch_image_and_members():
    from ensembles import make_config
    base = make_config("ova", backbone="simple_cnn", image_size=32, batch_size=16)
    one = build.training_memory_bytes(base, 2, 1)
    assert build.training_memory_bytes(base, 2, 4) == 4 * one
    bigger = build.training_memory_bytes(base.replace(image_size=64), 2, 1)
    assert 2 * one < bigger < 5 * one       # activations x4, parameters the same
    assert build.training_memory_bytes(base.replace(batch_size=32), 2, 1) > one


@pytest.mark.slow
def test_one_epoch_with_a_whole_epoch_of_warmup_trains(tmp_path, cache):
    out = tmp_path / "run"
    assert ensemble_cli.main("single", "", [*TINY, "--epochs", "1", "--warmup-epochs", "1",
                                            "--out", str(out), "--cache-dir", cache]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]


@pytest.mark.parametrize("argv,augment", [
    ([], False),                                              # synthetic phantoms vary already
    (["--augment"], True),
    (["--dataset", "image_folder", "--data-dir", "x"], True),  # real images: augmented
    (["--dataset", "image_folder", "--data-dir", "x", "--no-augment"], False),
])
def test_augmentation_defaults_to_off_for_synthetic_data_only(argv, augment):
    from experiments.common import parse
    config, _ = parse("ova", ["--backbone", "resnet50", *argv])
    assert config.data.augment is augment


@pytest.mark.parametrize("strategy,backbone", [("cascade", "resnet50"), ("ova", "resnet50"),
                                               ("ovo", "resnet50"), ("cascade", "simple_cnn"),
                                               ("ovo", "simple_cnn")])
def test_a_strategy_may_change_its_familys_defaults(strategy, backbone, capsys):
    """The ImageNet-family cascade (2 members) and OvO (6 members, still improving at 5
    epochs) get more epochs; everything else keeps the family's; --help shows the values the
    run will use, and a flag still wins."""
    from ensembles import make_config
    from ensembles.config import FAMILY_DEFAULTS, STRATEGY_DEFAULTS, family
    from experiments.common import parse
    kind = family(backbone)
    want = {**FAMILY_DEFAULTS[kind], **STRATEGY_DEFAULTS.get((kind, strategy), {})}
    changed = {k for k in want if want[k] != FAMILY_DEFAULTS[kind][k]}
    assert changed == ({"epochs"} if (kind, strategy) in {("imagenet", "cascade"),
                                                           ("imagenet", "ovo")} else set())
    config = make_config(strategy, backbone=backbone)
    assert (config.training.epochs, config.data.count, config.training.batch_size) == (
        want["epochs"], want["count"], want["batch_size"])
    assert parse(strategy, ["--backbone", backbone])[0] == config
    assert parse(strategy, ["--backbone", backbone, "--epochs", "2"])[0].training.epochs == 2
    assert parse(strategy, ["--backbone", backbone, "--batch-size", "4"]
                 )[0].training.batch_size == 4
    with pytest.raises(SystemExit):
        parse(strategy, ["--backbone", backbone, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--epochs EPOCHS (default: {want['epochs']} for " in text
    assert f"--batch-size BATCH_SIZE global batch size (default: {want['batch_size']} for " in text
