"""configs/*.yaml are the released command lines; YAML keys are the flags' names."""
import glob
import math
import os

import pytest
import torch
import yaml

from cakd.train.config import get_args_parser, parse_args, save_config
from cakd.train.optim import build_scheduler
from cakd.train.run import schedule_options

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


# ---- the learning rate of every epoch and the eval preset of every configs/*.yaml -------------
# Written from the texts, not from the YAMLs: reference.md ("The three recipes": steplr 30 / 0.1,
# the cakd recipe's 5 linear warmup epochs from 0.01 x lr chained before it, so its drops come at
# 35, 65 and 95; eval resize 224, crop 224) and paper.md ("Training set-up as written": ImageNet
# 120 epochs, lr 0.1 x0.1 at 30, 60, 90, no warmup, eval resize 256, crop 224 as the official
# PyTorch example; CIFAR-100 200 epochs, x0.1 at 100 and 150).
def lr_per_epoch(lr, epochs, drops, warmup_epochs=0, warmup_start=0.01, gamma=0.1):
    """The lr of each epoch: a linear ramp from ``warmup_start * lr`` over the warmup epochs,
    then ``lr`` times ``gamma`` for each epoch of ``drops`` already reached."""
    rates = []
    for epoch in range(epochs):
        if epoch < warmup_epochs:
            rates.append(lr * (warmup_start + (1 - warmup_start) * epoch / warmup_epochs))
        else:
            rates.append(lr * gamma ** sum(epoch >= drop for drop in drops))
    return rates


RELEASED_EVAL = (224, 224, "bilinear")  # (val_resize_size, val_crop_size, interpolation)
PYTORCH_EXAMPLE_EVAL = (256, 224, "bilinear")
PAPER_IMAGENET = (lr_per_epoch(0.1, 120, (30, 60, 90)), PYTORCH_EXAMPLE_EVAL)
PAPER_CIFAR = lr_per_epoch(0.1, 200, (100, 150))  # a CIFAR-100 YAML's row: (PAPER_CIFAR, its eval preset)
EXPECTED = {  # one row per configs/*.yaml: a new YAML needs its row here
    "baseline": (lr_per_epoch(0.1, 90, (30, 60)), RELEASED_EVAL),
    "logits": (lr_per_epoch(0.1, 120, (30, 60, 90)), RELEASED_EVAL),
    "cakd": (lr_per_epoch(0.1, 120, (35, 65, 95), warmup_epochs=5), RELEASED_EVAL),
    "paper_setup": PAPER_IMAGENET,
    "cakd_paper": PAPER_IMAGENET,
    "kd": PAPER_IMAGENET,
    "rkd": PAPER_IMAGENET,
    "irg": PAPER_IMAGENET,
    "ablation_logits": PAPER_IMAGENET,
    "ablation_gl": PAPER_IMAGENET,
    "ablation_pca": PAPER_IMAGENET,
    "ablation_robust": PAPER_IMAGENET,
    # CIFAR-100 (paper.md): images resized to the teacher's 224 input for training and evaluation
    "cifar100_baseline": (PAPER_CIFAR, (224, 224, "bilinear")),
    "cifar100_logits": (PAPER_CIFAR, (224, 224, "bilinear")),
    "cifar100_rkd": (PAPER_CIFAR, (224, 224, "bilinear")),
    "cifar100_irg": (PAPER_CIFAR, (224, 224, "bilinear")),
    "cifar100_cakd": (PAPER_CIFAR, (224, 224, "bilinear")),
    "cifar100_cakd_released": (PAPER_CIFAR, (224, 224, "bilinear")),
    # the teacher's fine-tuning (ours, the paper gives none): lr 0.003, one linear warmup epoch from
    # 1% of it, then a cosine decay over the other 9 epochs
    "cifar100_teacher": ([0.003 * 0.01] + [0.003 * (1 + math.cos(math.pi * k / 9)) / 2 for k in range(9)], (224, 224, "bilinear")),
}
# the classification trainer's YAMLs (the detection trainer's, detection_*.yaml, are tests/test_detection.py's)
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")) if not os.path.basename(p).startswith("detection_"))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_has_the_schedule_and_eval_preset_of_its_text(path):
    """The trainer's scheduler (stepped once per epoch) gives each epoch the lr of the text."""
    name = os.path.basename(path)[: -len(".yaml")]
    if name not in EXPECTED:
        pytest.fail(f"configs/{name}.yaml has no row in EXPECTED: write its lr per epoch and eval preset from the texts")
    rates, eval_preset = EXPECTED[name]
    args = parse_args(["--config", path])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = build_scheduler(optimizer, lr_min=args.lr_min, **schedule_options(args))
    got = []
    for _ in range(args.epochs):
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert len(got) == len(rates), f"{args.epochs} epochs, the text says {len(rates)}"
    wrong = [(epoch, a, b) for epoch, (a, b) in enumerate(zip(got, rates)) if not math.isclose(a, b, rel_tol=1e-9)]
    assert not wrong, f"(epoch, lr, text's lr): {wrong[:5]}"
    assert (args.val_resize_size, args.val_crop_size, args.interpolation) == eval_preset


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


def test_the_command_line_undoes_what_a_yaml_switched_on_or_set(tmp_path):
    """Every on/off flag has an off form and every optional number a none, so an extra flag
    wins over the YAML for each of them (the README's sentence)."""
    path = tmp_path / "c.yaml"
    path.write_text("ra_sampler: true\nmodel_ema: true\namp: true\nclip_grad_norm: 1.0\npca_qk_weight: 0.3\nadv_to_student: true\n")
    on = parse_args(["--config", str(path)])
    assert (on.ra_sampler, on.model_ema, on.amp, on.clip_grad_norm, on.pca_qk_weight, on.adv_to_student) == (True, True, True, 1.0, 0.3, True)
    off = parse_args(["--config", str(path), "--no-ra-sampler", "--model-ema", "false", "--no-amp", "--clip-grad-norm", "none",
                      "--pca-qk-weight", "none", "--no-adv-to-student"])
    assert (off.ra_sampler, off.model_ema, off.amp, off.clip_grad_norm, off.pca_qk_weight, off.adv_to_student) == (False, False, False, None, None, False)
    parser = get_args_parser()
    for action in parser._actions:
        if isinstance(action.nargs, int) and action.nargs == 0 and action.dest != "help":
            pytest.fail(f"{action.option_strings} switches on only")
        if action.option_strings and action.default is None and action.type not in (None, str) and action.nargs != "?":
            assert action.type("none") is None, f"{action.option_strings[0]} none"  # an optional number that none unsets
    for flag in [a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[-1].startswith("--no-")]:
        dest = flag[2:].replace("-", "_")
        assert vars(parse_args([flag]))[dest] is True and vars(parse_args(["--no-" + flag[2:]]))[dest] is False, flag


@pytest.mark.parametrize("argv, line", [
    (["--clip-grad-norm", "0"], "error: --clip-grad-norm 0.0: it would clip every gradient to zero; give a norm above 0, or none for no clipping; see --help"),
    (["--no-amp", "true"], "error: --no-amp takes no value: it means --amp false; see --help"),
    (["--ra-sampler", "maybe"], "error: argument --ra-sampler/--no-ra-sampler: expected true or false, got 'maybe'; see --help"),
])
def test_values_that_cannot_mean_what_they_say_are_refused(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_saved_config_neither_resumes_nor_only_tests(tmp_path):
    """Rerunning with --config runs/x/config.yaml trains that configuration afresh."""
    args = parse_args(["--resume", "runs/x/checkpoint.pth", "--test-only", "--start-epoch", "3", "--lr", "0.3"])
    path = str(tmp_path / "config.yaml")
    save_config(args, path)
    assert not {"resume", "test_only", "start_epoch"} & set(yaml.safe_load(open(path)))
    again = parse_args(["--config", path])
    assert (again.resume, again.test_only, again.start_epoch, again.lr) == ("", False, 0, 0.3)


def test_a_config_the_trainer_wrote_loads_again(tmp_path):
    """config.yaml keeps the process count of the run (world_size, set by torchrun, no flag):
    --config on it must still parse."""
    from cakd.train.distributed import init_distributed_mode

    args = parse_args(["--lr", "0.3"])
    init_distributed_mode(args.device, args.dist_url)
    args.world_size = 8  # as under torchrun --nproc_per_node 8
    path = str(tmp_path / "config.yaml")
    save_config(args, path)
    assert yaml.safe_load(open(path))["world_size"] == 8
    assert parse_args(["--config", path]).lr == 0.3


# ---- help that helps ---------------------------------------------------------------------------
def parsers():
    """The trainer's parser and every script's."""
    import importlib.util

    found = {"python -m cakd.train": get_args_parser()}
    for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))):
        spec = importlib.util.spec_from_file_location("script_" + os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[os.path.basename(path)] = module.get_args_parser()
    return found


def test_an_experiment_scripts_help_is_printed_once_with_the_values_it_runs():
    """Not once per rank, and not only the bare defaults: the YAML's 120 epochs, the script's folder."""
    import subprocess
    import sys

    env = {**os.environ, "NGPUS": "2", "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["sh", os.path.join(ROOT, "experiments", "run_cakd.sh"), "--lr", "0.2", "--help"],
                            capture_output=True, text=True, env=env, timeout=120)
    out = " ".join(result.stdout.split())  # argparse wraps lines at the terminal's width
    assert result.returncode == 0 and result.stderr == "" and out.count("usage: python -m cakd.train") == 1, result.stderr
    assert "number of total epochs to run [this command: 120] (default: 90)" in out
    assert "initial learning rate [this command: 0.2] (default: 0.1)" in out  # a flag after the YAML wins, as when it runs
    assert "path to save outputs [this command: runs/cakd]" in out and "[this command: auto]" in out
    assert "momentum (default: 0.9)" in out  # what the YAML leaves alone is not marked


def test_every_distiller_flag_says_what_it_does():
    """Each distiller field has a meaning (its comment in cakd/distillers.py, else config.MEANINGS)."""
    from cakd.train.config import distiller_option_fields, distiller_option_meanings

    meanings = distiller_option_meanings()
    assert not [field.name for field in distiller_option_fields() if not meanings.get(field.name)]
    help_text = " ".join(get_args_parser().format_help().split())
    assert "--pca-qk-weight PCA_QK_WEIGHT weight of first term of L_proj1: MSE(A_S_qk, A_T_qk)" in help_text
    assert "--lambda-max LAMBDA_MAX ramp: the top of lambda, the weight of the distillation terms (default: the released 0.2)" in help_text


def test_every_flag_shows_its_default_and_abbreviations_are_refused():
    for name, parser in parsers().items():
        assert not parser.allow_abbrev, name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                text = formatter._get_help_string(action)
                assert "default" in text or "(required)" in text, (name, action.option_strings, text)
    assert get_args_parser().format_usage().startswith("usage: python -m cakd.train ")


# ---- the README's commands for the comparison columns (Tables 1-2, Figure 3's ResNet50x2 rows) ---
def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def script_config(script):
    """The YAML an experiments/ script passes to the trainer."""
    import re

    found = re.findall(r"configs/(\w+\.yaml)", open(os.path.join(ROOT, "experiments", script)).read().split("exec ", 1)[1])
    assert len(found) == 1, script
    return found[0]


def readme_tables(section):
    """Each table of ``section`` as (header cells, rows of cells)."""
    tables, rows = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            tables.append((rows[0], [r for r in rows[2:]]))
            rows = []
    return tables


def test_every_readme_command_of_the_comparison_columns_parses():
    """Each cell's command (its column's script or YAML with its row's flags, or a whole
    command) parses with the trainer's parser into the cell's recipe, student and teacher; each
    number beside it is the one summarize.py compares the run with."""
    import shlex

    from cakd.train.published import figure3, published

    recipes = {"Logits": "kd", "RKD": "rkd", "IRG": "irg", "CAKD": "cakd", "C1": "kd"}
    parsed = 0
    tables = readme_tables(readme_section("The comparison columns (Tables 1 and 2)"))
    assert len(tables) == 5  # Table 2, its students alone, Figure 3, Table 1, its students alone
    for header, rows in tables:
        cifar = "cifar100" in " ".join(header)
        for row in rows:
            if header[0] == "student alone":
                command = shlex.split(row[1].strip("`"))
                if header[1] == "command":  # a whole command: the script's YAML, then its flags
                    script = next(word for word in command if word.startswith("experiments/"))
                    argv = ["--config", os.path.join(ROOT, "configs", script_config(os.path.basename(script))),
                            *command[command.index(script) + 1 :]]
                else:
                    argv = ["--config", os.path.join(ROOT, "configs", "cifar100_baseline.yaml"), *command]
                argv = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv]
                args = parse_args(argv)
                assert args.recipe == "baseline" and args.dataset == ("cifar100" if cifar else "imagefolder")
                numbers = published("cifar100" if cifar else "imagenet", "baseline", args.model)
                assert [float(v) for v in row[2].split(" / ")] == [n for n in numbers[-1][1:] if n is not None]
                parsed += 1
                continue
            flags = shlex.split(row[1].strip("`"))
            for column, cell in zip(header[2:], row[2:]):
                if "`" not in column:
                    continue  # C4, C5: the C3 and C6 runs evaluated with noise
                name = column.split("`")[1]
                config = script_config(name) if name.endswith(".sh") else name
                args = parse_args(["--config", os.path.join(ROOT, "configs", config), *flags])
                assert (args.model, args.teacher) == (flags[flags.index("--model") + 1], flags[flags.index("--teacher") + 1])
                label = column.split(":")[0]
                assert args.recipe == recipes.get(label, "cakd"), (column, args.recipe)
                if label in ("C1", "C2", "C3", "C6"):  # Figure 3
                    assert args.dataset != "cifar100"
                    got = dict(figure3(args.model, args.teacher, "C1"), **dict(figure3(args.model, args.teacher, "C2")),
                               **dict(figure3(args.model, args.teacher, "C3")), **dict(figure3(args.model, args.teacher, "C6")))
                    assert float(cell) == got[label]
                else:
                    assert (args.dataset == "cifar100") == cifar
                    numbers = published("cifar100" if cifar else "imagenet", args.recipe, args.model, args.teacher)
                    paper = [(top1, top5) for source, top1, top5 in numbers if source == "paper"]
                    assert paper == [tuple(float(v) for v in cell.split(" / "))] if not cifar else paper == [(float(cell), None)]
                parsed += 1
    assert parsed == 24 + 2 + 2 * 4 + 24 + 2  # Table 2, its students, Figure 3's trained columns, Table 1, its students
