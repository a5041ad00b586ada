"""A newcomer's first hour (issue 29): values torch would refuse are refused at parse time, a
failed start leaves the run folder as it was, and the small things a first run shows."""
import os

import pytest
import torch

from cakd.train.config import parse_args


@pytest.mark.parametrize("argv, shown", [
    (["--lr", "-1"], "--lr -1.0: a learning rate cannot be negative; give 0 or more"),
    (["--lr-min", "-0.1"], "--lr-min -0.1: a learning rate cannot be negative; give 0 or more"),
    (["--momentum", "-0.9"], "--momentum -0.9: a momentum cannot be negative; give 0 or more (0.9: the recipes')"),
    (["--wd", "-0.0001"], "--weight-decay -0.0001: a weight decay cannot be negative; give 0 or more"),
    (["--norm-weight-decay", "-1"], "--norm-weight-decay -1.0: a weight decay cannot be negative; give 0 or more, or none for --wd"),
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5: it must be between 0 and 1 (0: none, 0.1: the usual)"),
    (["--label-smoothing", "-0.1"], "--label-smoothing -0.1: it must be between 0 and 1 (0: none, 0.1: the usual)"),
    (["--lr-warmup-decay", "0"], "--lr-warmup-decay 0.0: it must be above 0 and at most 1 (the warmup's first lr over --lr)"),
    (["--random-erase", "2"], "--random-erase 2.0: it is a probability: between 0 and 1"),
    (["--augmix-severity", "11"], "--augmix-severity 11: AugMix's severity is from 1 to 10"),
    (["--ra-magnitude", "31"], "--ra-magnitude 31: RandAugment's magnitude is a bin from 0 to 30"),
    (["--workers", "-1"], "--workers -1: it must be 0 or more (0: load the data in the training process)"),
    (["--opt", "adam"], "--opt adam: not an optimizer: use sgd, sgd_nesterov, rmsprop or adamw"),
    (["--opt", "sgd_nesterov", "--momentum", "0"],
     "--opt sgd_nesterov with --momentum 0: Nesterov momentum needs a momentum above 0; give one, or use --opt sgd"),
])
def test_values_torch_would_refuse_are_one_line_at_parse_time(argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [f"error: {shown}; see --help"]


@pytest.mark.parametrize("build", [
    lambda p: torch.optim.SGD(p, lr=-1.0),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=-0.9),
    lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=-1e-4),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.0, nesterov=True),
    lambda p: torch.nn.CrossEntropyLoss(label_smoothing=1.5)(torch.zeros(2, 3), torch.tensor([0, 1])),
])
def test_torch_itself_refuses_those_values(build):
    """What the parse-time checks stand in for: torch refuses these once the models are built."""
    with pytest.raises((ValueError, RuntimeError)):
        build([torch.zeros(1, requires_grad=True)])


def test_the_trainer_refuses_a_negative_lr_before_building_anything(tmp_path, capsys):
    from cakd.train import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--lr", "-1", "--device", "cpu", "--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --lr -1.0: a learning rate cannot be negative; give 0 or more; see --help"]
    assert not out.exists()
