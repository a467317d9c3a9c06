"""`python -m train` and `python -m train backbone` say what they do (issue 13): the recommended backbone
is the default, help names which flags each path uses, and no line claims something that is not so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from faceberry.train import backbone, cli


def test_backbone_defaults_to_the_shipped_dlib_resnet():
    args = backbone.build_parser().parse_args(["--out", "x"])
    assert args.arch == "dlib-resnet"
    assert backbone.build_parser().parse_args(["--out", "x", "--arch", "mobilenetv2"]).arch == "mobilenetv2"


def test_a_wrong_backbone_path_recommends_the_dlib_resnet_command(tmp_path):
    with pytest.raises(backbone.BackboneError) as info:
        backbone.load_embedder(tmp_path / "nothing-here")
    assert "python -m train backbone --arch dlib-resnet --out backbones/faces" in str(info.value)
    assert "--photos" not in str(info.value)


def test_the_split_keeps_the_public_names():
    from faceberry.train.backbone import BackboneError, load_embedder  # noqa: F401 - what faceberry.train.fewshot and bench import
    from faceberry.train.distill import make_views, run  # noqa: F401
    from faceberry.train.dlib_port import run_dlib_port  # noqa: F401


def test_help_groups_say_which_path_each_flag_belongs_to():
    text = cli.build_parser().format_help()
    assert "model (fine-tune path only; ignored with --backbone)" in text
    assert "augmentation, ImageDataGenerator style (fine-tune path only)" in text
    assert "face crops (both paths)" in text
    assert "--log-level" in text
    # curves.png and confusion.png are promised only for the fine-tune path.
    assert "a fine-tune\nrun (no --backbone) also draws curves.png and confusion.png" in text


def _parse(argv: list[str]):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    cli._validate(parser, args)
    return parser, args


def test_input_size_defaults_to_128_or_to_the_backbones_own(tmp_path):
    _, args = _parse(["--photos", "p", "--out", "o"])
    assert args.input_size == 128
    bb = tmp_path / "bb"
    bb.mkdir()
    (bb / "config.json").write_text(json.dumps({"input_size": 150}))
    _, args = _parse(["--photos", "p", "--out", "o", "--backbone", str(bb)])
    assert args.input_size == 150  # so faceberry.train.fewshot has nothing to warn about
    _, args = _parse(["--photos", "p", "--out", "o", "--backbone", str(bb), "--input-size", "128"])
    assert args.input_size == 128  # the user's own choice, which fewshot warns about
    _, args = _parse(["--photos", "p", "--out", "o", "--backbone", str(tmp_path / "missing")])
    assert args.input_size is None  # left to load_embedder's error


def test_fine_tune_flags_given_with_a_backbone_are_named_as_ignored(tmp_path, caplog):
    parser, args = _parse(["--photos", "p", "--out", "o", "--backbone", str(tmp_path), "--epochs", "3", "--zoom", "0"])
    with caplog.at_level(logging.WARNING, logger="faceberry.train.cli"):
        cli._warn_ignored(parser, args)
    assert "ignoring --epochs, --zoom" in caplog.text
    caplog.clear()
    parser, args = _parse(["--photos", "p", "--out", "o", "--backbone", str(tmp_path), "--seed", "3"])
    with caplog.at_level(logging.WARNING, logger="faceberry.train.cli"):
        cli._warn_ignored(parser, args)
    assert caplog.text == ""


def test_backbone_help_puts_the_recommended_command_first():
    text = backbone.build_parser().format_help()
    assert text.index("--arch dlib-resnet (the default, recommended)") < text.index("--arch mobilenetv2:")
    assert "python -m train backbone --arch dlib-resnet --out backbones/faces" in text


def test_train_module_files_stay_small():
    # The split's point: one job per module, none of them the old 657-line catch-all.
    root = Path(cli.__file__).parent
    for name in ("backbone.py", "distill.py", "dlib_port.py"):
        assert len((root / name).read_text().splitlines()) < 400, name
