"""Flags -> typed config for every training CLI, and how a CLI reports errors.

The flags are generated from the fields of `ensembles.config.RunConfig` (name, type, choices,
help, default): a setting added there is a flag here. `parse` turns argv into a resolved
RunConfig plus where the run goes; the API trains it; the CLI prints one summary line.
`--help` shows every default once, the family defaults of `--backbone` first.

Errors: `fail` prints the user's errors (USER_ERRORS, and OSErrors about the user's paths or
a full / read-only / forbidden filesystem) as one `error: ...` line with exit code 2, and
re-raises anything else, which is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from backbones import training
from backbones.weights import WeightsDownloadError
from data_pipeline.image_source import DataError, DecodeError
from ensembles.bundle.schema import BundleError
from ensembles.config import (
    FAMILIES,
    FIELDS,
    LAUNCH,
    SECTIONS,
    ConfigError,
    RunConfig,
    choices_of,
    family,
    for_resume,
    join_cluster,
    make_config,
    unknown_choice,
)
from ensembles.training import runs

# The user's errors: bad settings, refused data (a bad data folder, unknown classes, an empty
# dataset, a split the data cannot satisfy), a bad bundle or image file, weights that cannot
# be fetched, a diverged run, a refused non-finite checkpoint. Every CLI reports them through
# `except Exception as error: return common.fail(error, argv)`.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataError, BundleError, DecodeError, WeightsDownloadError,
    training.TrainingDiverged, training.NonFiniteError)
# A filesystem the user must fix: full, over quota, read-only, forbidden.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
LAYOUT_NAMES = {"covid19_radiography": "the Kaggle COVID-19 Radiography layout (<Class>/images/)",
                "chest_xray_pneumonia": "Kermany's chest_xray layout ({train,test}/NORMAL|"
                                        "PNEUMONIA/)",
                "image_folder": "one folder per class"}
GROUPS = {"data": None, "model": None, "training": None, "ensemble": None, "run": None,
          "processes": "one training over several processes (machines): start the same "
                       "command in each with its --process-id; without these flags a single "
                       "process runs, or under SLURM (several tasks) and on Cloud TPU VMs JAX "
                       "finds the others itself"}


def user_error(error: BaseException, argv: Sequence[str] | None = None) -> bool:
    """Whether `error` is the user's to fix: one of USER_ERRORS, or an OSError about a path
    named in `argv` (or the default runs/), about the filesystem (ENVIRONMENT_ERRNOS) or
    raised by the project with its own message (no errno)."""
    if isinstance(error, USER_ERRORS):
        return True
    if not isinstance(error, OSError):
        return False
    if error.errno is None or error.errno in ENVIRONMENT_ERRNOS:
        return True
    named = [_path(a.partition("=")[2] if a.startswith("-") else a)
             for a in ("runs", *(sys.argv[1:] if argv is None else argv))]  # runs/: --out's
    files = [_path(f) for f in (error.filename, error.filename2) if f is not None]
    return any(f == p or p in f.parents for f in files for p in named if p is not None)


def _path(text) -> Path | None:
    try:
        return Path(text).expanduser().resolve() if text else None
    except (OSError, RuntimeError, TypeError, ValueError):
        return None


def fail(error: Exception, argv: Sequence[str] | None = None) -> int:
    """A CLI's `except Exception as error: return fail(error, argv)`: the user's error as
    `error: ...` on stderr, exit code 2; anything else re-raised with its traceback."""
    if not user_error(error, argv):
        raise error
    print(f"error: {error}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit code 2, no usage dump) that name the
    closest valid choice or flag."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}\n")

    def _check_value(self, action: argparse.Action, value: typing.Any) -> None:
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(None, unknown_choice(action.dest, value, action.choices))

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = {s.lstrip("-"): s for a in self._actions for s in a.option_strings}
            close = {a: difflib.get_close_matches(a.partition("=")[0].lstrip("-"), flags, n=1)
                     for a in extras if a.startswith("--")}
            hints = [f"{flags[c[0]]}" + (f" (for {a})" if len(close) > 1 else "")
                     for a, c in close.items() if c]
            self.error(f"unrecognized arguments: {' '.join(extras)}" +
                       (f"; did you mean {', '.join(hints)}?" if hints else ""))
        return parsed


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """Where a run goes and whether it continues or replaces what is there."""

    out: Path | None
    resume: bool
    overwrite: bool


def names_flag(text: str, what: str) -> list[str]:
    """A comma-separated flag of distinct names (--strategies, --backbones, --runs)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--{what}: give at least one name")
    if len(set(names)) != len(names):
        raise ConfigError(f"--{what}: {', '.join(names)} repeats a name")
    return names


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _default_text(field: dataclasses.Field, strategy: str, backbone: str | None) -> str | None:
    """The default as --help shows it: per family (--backbone's first), what "auto" or None
    becomes, in words, or the value; None for a switch or an unset option."""
    meta = field.metadata
    if "family" in meta:
        value = {k: meta.get("strategy", {}).get((k, strategy), v)
                 for k, v in meta["family"].items()}
        mine = family(backbone) if backbone in (choices_of("backbone") or ()) else None
        order = sorted(value, key=lambda k: k != mine)
        return ", ".join(f"{value[k]} for {FAMILIES[k]}" + (f" like {backbone}" if k == mine
                                                             else "") for k in order)
    if "auto" in meta:
        return f"auto: {meta['auto']}" if field.default == "auto" else meta["auto"]
    if "shown" in meta:
        return meta["shown"]
    return None if field.default is None or isinstance(field.default, bool) else str(
        field.default)


def _add_flag(group, field: dataclasses.Field, kind: type, strategy: str,
              backbone: str | None) -> None:
    meta, name = field.metadata, field.name
    flag = meta.get("flag", "--" + name.replace("_", "-"))
    default = _default_text(field, strategy, backbone)
    text = " ".join(t for t in (meta.get("help"), default and f"(default: {default})") if t)
    options: dict[str, typing.Any] = {"dest": name, "default": argparse.SUPPRESS,
                                      "help": text.replace("%", "%%") or None}
    hint = typing.get_type_hints(kind)[name]
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if base is bool:
        options["action"] = ("store_false" if field.default else "store_true"
                             if field.default is False else argparse.BooleanOptionalAction)
    else:
        options["type"] = _comma_list if typing.get_origin(base) is tuple else base
        options["choices"] = choices_of(field)
        options["metavar"] = meta.get("metavar")
        if "const" in meta:
            options.update(nargs="?", const=meta["const"])
    group.add_argument(flag, **{k: v for k, v in options.items() if v is not None})


def build_parser(strategy: str, description: str, backbone: str | None = None) -> Parser:
    """Every flag of a training CLI: one per RunConfig field (but the strategy, which is the
    CLI's), with --backbone's family defaults first in --help; and --out, --overwrite,
    --resume."""
    parser = Parser(prog=f"python -m experiments.{strategy}", description=description)
    groups = {name: parser.add_argument_group(name, text) for name, text in GROUPS.items()}
    fields = [(f, kind, f.metadata.get("group", section)) for section, kind in SECTIONS.items()
              for f in dataclasses.fields(kind) if f.metadata.get("cli", True)]
    for field, kind, group in fields:
        if group in SECTIONS:
            _add_flag(groups[group], field, kind, strategy, backbone)
    run = groups["run"]
    run.add_argument("--out", help="run directory (default: runs/<experiment>-<backbone>-<UTC "
                                   "time>/)")
    run.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its latest checkpoint (the same "
                          "settings; anything else is refused before a file changes)")
    for field, kind, group in fields:
        if group not in SECTIONS:
            _add_flag(groups[group], field, kind, strategy, backbone)
    return parser


def _given_backbone(argv: Sequence[str]) -> str:
    """--backbone's value in argv (for --help's family defaults), else the default."""
    backbone = RunConfig().model.backbone
    for i, arg in enumerate(argv):
        if arg == "--backbone" and i + 1 < len(argv):
            backbone = argv[i + 1]
        elif arg.startswith("--backbone="):
            backbone = arg.partition("=")[2]
    return backbone


def _saved_config(out: Path) -> dict | None:
    """The run config in out/config.json, None when there is none to read."""
    try:
        return json.loads((out / runs.CONFIG_FILE).read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def parse(strategy: str, argv: Sequence[str] | None, description: str = ""
          ) -> tuple[RunConfig, RunTarget]:
    """The resolved run config and target of a command line; ConfigError for settings that
    cannot run. It joins the processes the flags name first (before JAX picks its backend
    for the hardware autos); with --resume, members and member data follow the run's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser(strategy, description, _given_backbone(argv)).parse_args(argv))
    target = RunTarget(Path(args["out"]) if args.get("out") else None, args["resume"],
                       args["overwrite"])
    if target.resume and target.out is None:
        raise ConfigError("--resume needs --out (the run to continue)")
    settings = {k: v for k, v in args.items() if k in FIELDS}
    join_cluster(**{k: settings[k] for k in LAUNCH if k in settings})
    config = make_config(strategy, **settings)
    if config.data.data_dir and "dataset" not in settings:
        print(f"--data-dir {config.data.data_dir} holds {LAYOUT_NAMES[config.data.dataset]}: "
              f"--dataset {config.data.dataset}", file=sys.stderr)
    if target.resume:
        config = for_resume(config, _saved_config(target.out))
    return config, target
