"""The training CLIs' flags are generated from RunConfig's fields: every field has its flag
(or is excluded by name), the flags are those the docs name, each parses into its field with
the field's type, and --help shows every default once, the family defaults per family."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from ensembles import config as config_lib
from ensembles.config import FAMILY_DEFAULTS, FIELDS, SECTIONS
from experiments import common

# The flags of the training CLIs as docs/commands.md and the README document them.
FLAGS = {
    "--dataset", "--data-dir", "--cache-dir", "--count", "--classes", "--image-size",
    "--channels", "--normalization", "--clahe", "--lung-mask", "--segmenter", "--split-recipe",
    "--balance", "--augment", "--no-augment", "--workers", "--quality-max",
    "--quality-drop-worst", "--backbone", "--head", "--width", "--pretrained", "--freeze",
    "--head-epochs", "--precision", "--epochs", "--batch-size", "--lr", "--optimizer",
    "--schedule", "--warmup-epochs", "--weight-decay", "--label-smoothing", "--clip-norm",
    "--monitor", "--early-stopping-patience", "--parallel", "--members", "--member-data",
    "--keep-checkpoints", "--seed", "--meta", "--meta-folds", "--healthy", "--ovo-decision",
    "--target-sensitivity", "--operating-point", "--min-per-class", "--n-bootstrap", "--out",
    "--overwrite", "--resume", "--no-progress", "--coordinator", "--num-processes",
    "--process-id", "-h", "--help"}
EXCLUDED = {"strategy"}          # each CLI module is one strategy
META_KEYS = {"help", "choices", "auto", "shown", "family", "strategy", "valid", "flag",
             "metavar", "group", "const", "cli"}


def _flag_actions(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_field_has_its_flag_or_is_excluded_by_name():
    parser = common.build_parser("ova", "")
    actions = _flag_actions(parser)
    for name, (_, field) in FIELDS.items():
        assert (name in actions) != (name in EXCLUDED), name
        assert (field.metadata.get("cli", True) is False) == (name in EXCLUDED), name
        assert set(field.metadata) <= META_KEYS, (name, set(field.metadata) - META_KEYS)
    assert set(actions) - set(FIELDS) == {"out", "overwrite", "resume"}
    assert {s for a in parser._actions for s in a.option_strings} == FLAGS


def test_a_new_field_is_a_new_flag(monkeypatch):
    """Adding a setting is one line in ensembles/config.py: the CLI picks it up."""
    @dataclasses.dataclass(frozen=True)
    class Extra(config_lib.EnsembleConfig):
        vote_weight: float = config_lib.setting(0.5, "how much a vote weighs")
    monkeypatch.setitem(SECTIONS, "ensemble", Extra)
    parser = common.build_parser("ova", "")
    assert parser.parse_args(["--vote-weight", "2"]).vote_weight == 2.0
    text = " ".join(parser.format_help().split())
    assert "--vote-weight VOTE_WEIGHT how much a vote weighs (default: 0.5)" in text


def _value(name, field, kind):
    """A valid value other than the default, as text for the flag, and as parsed."""
    choices = config_lib.choices_of(name)
    if choices:
        v = next(c for c in choices if c != field.default)
        return str(v), v
    hint = typing.get_type_hints(kind)[name]
    base = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if typing.get_origin(base) is tuple:
        return "covid, normal", ("covid", "normal")
    return {int: ("7", 7), float: ("0.25", 0.25), str: ("x:1", "x:1")}[base]


@pytest.mark.parametrize("name", sorted(set(FIELDS) - EXCLUDED))
def test_each_flag_parses_into_its_field_with_its_type(name):
    section, field = FIELDS[name]
    kind = SECTIONS[section]
    parser = common.build_parser("ova", "")
    action = _flag_actions(parser)[name]
    flag = action.option_strings[0]
    if isinstance(field.default, bool) or field.default is None and typing.get_type_hints(
            kind)[name] == bool | None:
        argv, want = [flag], flag != "--no-progress"
    else:
        text, want = _value(name, field, kind)
        argv = [flag, text]
    assert getattr(parser.parse_args(argv), name) == want
    assert name not in vars(parser.parse_args([])), "an unset flag leaves the config's default"


def _help(strategy="ova", backbone=None):
    argv = ["--help"] if backbone is None else ["--backbone", backbone, "--help"]
    parser = common.build_parser(strategy, "", common._given_backbone(argv))
    return parser.format_help()


def _entries(text):
    """Each option's help entry (flag line plus its wrapped description) in one line."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = " ".join(line.split())
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("strategy", ["single", "ova", "ovo", "cascade"])
@pytest.mark.parametrize("backbone", [None, "resnet50"])
def test_help_shows_each_default_once_and_no_placeholder(strategy, backbone):
    entries = _entries(_help(strategy, backbone))
    for entry in entries.values():
        assert entry.count("default:") <= 1, entry
        for wrong in ("(default: None)", "(default: True)", "(default: False)",
                      "==SUPPRESS=="):
            assert wrong not in entry, entry
    assert entries["--classes"].endswith("keep (default: all found)")
    assert entries["--no-progress"] == "--no-progress no progress bars"
    assert entries["--clahe"] == "--clahe CLAHE before resizing"
    assert "default" not in entries["--data-dir"]
    assert entries["--augment"].endswith("(default: on, except for synthetic_cxr, whose "
                                         "phantoms vary already)")
    assert entries["--precision"].endswith("(default: auto: bf16 on a GPU or TPU, fp32 on CPU)")


@pytest.mark.parametrize("backbone,mine,theirs", [
    ("simple_cnn", "custom_cnn", "imagenet"), ("resnet50", "imagenet", "custom_cnn")])
def test_help_shows_the_family_defaults_chosen_backbone_first(backbone, mine, theirs):
    entries = _entries(_help("ova", backbone))
    name = config_lib.FAMILIES
    for flag, key in (("--image-size", "image_size"), ("--count", "count"),
                      ("--batch-size", "batch_size"), ("--epochs", "epochs")):
        want = (f"(default: {FAMILY_DEFAULTS[mine][key]} for {name[mine]} like {backbone}, "
                f"{FAMILY_DEFAULTS[theirs][key]} for {name[theirs]})")
        assert entries[flag].endswith(want), entries[flag]


def test_help_of_a_strategy_shows_its_changed_family_default():
    entry = _entries(_help("ovo", "resnet50"))["--epochs"]
    assert entry == ("--epochs EPOCHS (default: 6 for ImageNet backbones like resnet50, "
                     f"{FAMILY_DEFAULTS['custom_cnn']['epochs']} for custom CNNs)")


def test_help_with_a_misspelt_backbone_still_shows_both_families():
    entry = _entries(_help("ova", "resnet5O"))["--batch-size"]
    assert entry.endswith("(default: 32 for custom CNNs, 16 for ImageNet backbones)")


OWN = ("ensembles/config.py", "experiments/common.py", "experiments/ensemble_cli.py",
       "experiments/single.py", "experiments/ova.py", "experiments/ovo.py",
       "experiments/cascade.py", "experiments/segment.py", "experiments/reproduce.py")
DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b|#\d{2,}\b|\bissue\b|\d\.\d+x\b|macro-F1 0\.\d", re.I)


def test_help_and_comments_carry_no_issue_numbers_or_dated_figures():
    """Measured figures live in docs/measured.md (with their dates); code points there."""
    root = Path(config_lib.__file__).resolve().parents[1]   # the checkout
    for path in OWN:
        for n, line in enumerate((root / path).read_text().splitlines(), 1):
            comment = line.partition("#")[2] if "#" in line else ""
            assert not DATED.search(comment), f"{path}:{n}: {line.strip()}"
    for strategy in ("single", "ova", "ovo", "cascade"):
        assert not DATED.search(_help(strategy))
    assert not any(DATED.search(f.metadata.get("help", "") + str(f.metadata.get("auto", "")))
                   for _, f in FIELDS.values())
