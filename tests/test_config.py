"""configs/*.yaml are the released command lines; YAML keys are the flags' names."""
import os

import pytest
import yaml

from cakd.train.config import get_args_parser, parse_args, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The released scripts' command lines, written out from reference.md ("The three recipes").
COMMON = "--model resnet50 --batch-size 32 --workers 16 --lr 0.1 --momentum 0.9 --opt sgd --lr-scheduler steplr"
COMMON += " --lr-step-size 30 --lr-gamma 0.1 --interpolation bilinear --train-crop-size 224 --val-resize-size 224"
COMMON += " --val-crop-size 224"
DISTILL = " --teacher vit_b_16 --teacher-weights IMAGENET1K_V1 --label-smoothing 0.1 --epochs 120"
DISTILL += " --model-ema --model-ema-steps 32 --model-ema-decay 0.99998 --ra-sampler --ra-reps 4"
RELEASED = {
    "baseline": "--recipe baseline --epochs 90 --wd 1e-4 " + COMMON,
    "logits": "--recipe logits --wd 1e-4 " + COMMON + DISTILL,
    "cakd": "--recipe cakd --wd 2e-5 --norm-weight-decay 0.0 --lr-warmup-epochs 5 --lr-warmup-method linear"
    " --lr-warmup-decay 0.01 --auto-augment ta_wide --random-erase 0.1 --mixup-alpha 0.2 " + COMMON + DISTILL,
}


@pytest.mark.parametrize("recipe", sorted(RELEASED))
def test_yaml_is_exactly_the_released_command_line(recipe):
    from_yaml = vars(parse_args(["--config", os.path.join(ROOT, "configs", f"{recipe}.yaml")]))
    from_cli = vars(parse_args(RELEASED[recipe].split()))
    from_yaml.pop("config"), from_cli.pop("config")
    assert from_yaml == from_cli


def test_released_values_that_matter():
    args = parse_args(["--config", os.path.join(ROOT, "configs", "cakd.yaml")])
    assert (args.weight_decay, args.norm_weight_decay, args.label_smoothing) == (2e-5, 0.0, 0.1)
    assert (args.lr_warmup_epochs, args.lr_warmup_method, args.mixup_alpha, args.ra_reps) == (5, "linear", 0.2, 4)
    assert args.epochs == 120 and args.model_ema and args.ra_sampler and args.auto_augment == "ta_wide"
    assert args.pca_qk_weight is None  # unset: the distiller's released default applies


def test_command_line_wins_over_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nlr-warmup-epochs: 3\nmodel_ema: true\nadv_to_student: true\n")
    args = parse_args(["--config", str(path), "--lr", "0.2"])
    assert args.lr == 0.2 and args.lr_warmup_epochs == 3 and args.model_ema and args.adv_to_student is True


def test_unknown_yaml_key_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(path)])
    assert exit_info.value.code == 2
    assert "unknown key(s) learning_rate" in capsys.readouterr().err


def test_bad_choice_in_yaml_is_an_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: fitnet\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "recipe='fitnet' is not one of" in capsys.readouterr().err


def test_saved_config_loads_back_to_the_same_args(tmp_path):
    args = parse_args(["--config", os.path.join(ROOT, "configs", "cakd.yaml"), "--lr", "0.3", "--feature-weight", "0.1"])
    args.rank, args.distributed, args.gpu = 0, False, 0
    path = str(tmp_path / "config.yaml")
    save_config(args, path)
    again = parse_args(["--config", path])
    for key, value in vars(args).items():
        if key not in ("config", "rank", "distributed", "gpu"):
            assert getattr(again, key) == value, key
    assert yaml.safe_load(open(path))["feature_weight"] == 0.1


def test_every_distiller_number_is_a_flag():
    dests = {a.dest for a in get_args_parser()._actions}
    for name in ("pca_qk_weight", "pca_vv_weight", "logits_weight", "token_weight", "feature_weight",
                 "adv_real_weight", "lambda_start", "lambda_span", "lambda_max", "disc_lr_factor",
                 "disc_real_grad", "adv_to_student"):
        assert name in dests


def test_config_key_loads_a_parent_file_first(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("lr: 0.5\nepochs: 7\n")
    (tmp_path / "child.yaml").write_text("config: base.yaml\nlr: 0.2\n")
    args = parse_args(["--config", str(tmp_path / "child.yaml")])
    assert (args.lr, args.epochs) == (0.2, 7)
    (tmp_path / "loop.yaml").write_text("config: loop.yaml\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "loop.yaml")])
    assert "includes itself" in capsys.readouterr().err


def test_typos_are_one_line_naming_the_nearest_flag_or_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--lrr", "0.1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: unrecognized arguments: --lrr 0.1 (did you mean --lr?); see --help"]
    path = tmp_path / "c.yaml"
    path.write_text("lr_warmup_epoch: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "unknown key(s) lr_warmup_epoch (lr_warmup_epoch: did you mean lr_warmup_epochs?)" in err[0]


def test_print_freq_zero_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--print-freq", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --print-freq 0: it must be 1 or more (iterations between progress lines); see --help"]


def test_saved_config_neither_resumes_nor_only_tests(tmp_path):
    """Rerunning with --config runs/x/config.yaml trains that configuration afresh."""
    args = parse_args(["--resume", "runs/x/checkpoint.pth", "--test-only", "--start-epoch", "3", "--lr", "0.3"])
    path = str(tmp_path / "config.yaml")
    save_config(args, path)
    assert not {"resume", "test_only", "start_epoch"} & set(yaml.safe_load(open(path)))
    again = parse_args(["--config", path])
    assert (again.resume, again.test_only, again.start_epoch, again.lr) == ("", False, 0, 0.3)
