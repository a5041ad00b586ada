"""Command line and YAML: a YAML file is a saved command line.

Flags keep the names, defaults and meaning of the released scripts (a fork of
torchvision's ``references/classification/train.py``); a ``--config FILE.yaml`` holds the
same names (``lr_warmup_epochs`` or ``lr-warmup-epochs``) and the command line wins over
it. The distiller's numbers (loss weights, lambda ramp, quirk switches) are flags too,
generated from the recipe config dataclasses, so each has one source of truth.
"""
import argparse
import dataclasses
import difflib
import inspect
import os
import re
import sys

import torch
import yaml

from ..weights import write_text_atomic
from ..corruptions import VIEW_PROTOCOLS
from ..distillers import DISTILLERS, config_choices
from ..zoo import student_names
from ..teachers.registry import TEACHERS
from .report import first_to_report
from .optim import SCHEDULERS
from .plugins import PluginError, load_plugins, plugins_in

# what a run is asked to do, not how it trains: kept out of config.yaml and the checkpoint's args,
# so that rerunning with --config runs/x/config.yaml neither resumes nor only tests by accident
NOT_SAVED = ("config", "distributed", "rank", "gpu", "resume", "start_epoch", "test_only", "start_over")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line (with the nearest flag for a typo), said once
    per run under torchrun, instead of the whole usage text from every rank."""

    def error(self, message):
        if first_to_report():
            print(f"error: {message}{self.suggestion(message)}; see --help", file=sys.stderr, flush=True)
        sys.exit(2)

    def suggestion(self, message):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            near = nearest(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
            return f" (did you mean {near}?)" if near else ""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for word in message.split(":", 1)[1].split():
            if word.startswith("-"):
                near = nearest(word.split("=")[0], flags)
                if near:
                    return f" (did you mean {near}?)"
        return ""


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        shown = "off" if default is False else "none" if default in (None, "", []) else "%(default)s"
        return f"{text} (default: {shown})"

    def _format_action_invocation(self, action):
        if isinstance(action, Switch):  # the off form takes no value
            return f"{action.option_strings[0]} [true|false], {action.option_strings[1]}"
        return super()._format_action_invocation(action)


def nearest(word, choices):
    """The choices that start with ``word`` (up to three: "a, b or c"), else the one closest to
    it, else None."""
    found = [choice for choice in choices if choice.startswith(word)][:3]
    found = found or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return " or ".join([", ".join(found[:-1]), found[-1]] if len(found) > 1 else found) or None


def _bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _optional_str(value):
    return None if value is None or str(value).lower() in ("", "none", "null") else value


def optional(kind):
    """A number flag that ``none`` unsets: a YAML's value can be undone on the command line."""

    def convert(value):
        return None if _optional_str(value) is None else kind(value)

    convert.__name__ = kind.__name__  # argparse names the type in "invalid float value"
    return convert


class Switch(argparse.BooleanOptionalAction):
    """An on/off flag: ``--x`` and ``--no-x``, or ``--x true|false`` (the distiller's switches
    took a value, and a YAML key gives one), so the command line can undo what a YAML set."""

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        super().__init__(option_strings, dest, default=default, **kwargs)
        self.nargs, self.type, self.metavar, self.help = "?", _bool, "true|false", help  # help: HelpFormatter adds the default

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-") and values is not None:
            parser.error(f"{option_string} takes no value: it means {option_string.replace('--no-', '--', 1)} false")
        setattr(namespace, self.dest, not option_string.startswith("--no-") if values is None else values)


def distiller_option_fields():
    """The config fields of every recipe, except label smoothing (a recipe-wide flag)."""
    seen = {}
    for recipe in DISTILLERS.values():
        for field in dataclasses.fields(recipe.config_class):
            if field.name != "label_smoothing":
                seen.setdefault(field.name, field)
    return list(seen.values())


def get_args_parser(add_help=True):
    p = ArgumentParser(
        prog="python -m cakd.train",
        usage="%(prog)s [--config FILE.yaml] [--flag value ...]   (or torchrun ... -m cakd.train ...)",
        description="Cross-architecture knowledge distillation training: the released recipes and the paper's, with torchrun",
        add_help=add_help,
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", default=None, type=str, help="YAML file of flag values (the command line wins)")

    g = p.add_argument_group("recipe and models")
    g.add_argument(
        "--recipe", default="cakd", choices=sorted(DISTILLERS),
        help="the method: baseline (the student alone), logits (released: logit MSE), kd (Hinton), rkd, irg, cakd, or one a "
        "--plugin registers",
    )
    g.add_argument(
        "--plugin", default=[], action="append", metavar="MODULE",
        help="import MODULE (a module name, or a .py file) first: the recipes and teacher families it registers become "
        "--recipe and --teacher values, its config fields flags (docs/extending.md); repeatable",
    )
    g.add_argument(
        "--model",
        "--student",
        default="resnet50",
        dest="model",
        choices=student_names(),
        metavar="NAME",
        help=f"student model, a torchvision CNN (a ViT or Swin too for the baseline and logits recipes): {', '.join(student_names())}",
    )
    g.add_argument("--teacher", default="vit_b_16", choices=TEACHERS, metavar="NAME", help=f"teacher model: {', '.join(TEACHERS)}")
    g.add_argument(
        "--teacher-weights",
        default="IMAGENET1K_V1",
        type=str,
        help="torchvision weights enum member (cached download), a local .pth file, or none (random, smoke runs only)",
    )
    g.add_argument(
        "--weights",
        default=None,
        type=_optional_str,
        help="student weights: a weights enum member or .pth that initialises training (a classifier of another class "
        "count starts afresh), or the checkpoint/export to evaluate with --test-only",
    )

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default="/datasets01/imagenet_full_size/061417/", type=str, help="dataset path")
    g.add_argument(
        "--dataset",
        default="imagefolder",
        choices=["imagefolder", "cifar100", "synthetic", "celeba_spoof"],
        help="imagefolder: DATA/{train,val}/<class>/; cifar100: torchvision's CIFAR100 in DATA; synthetic: random images; "
        "celeba_spoof: CelebA-Spoof (DATA/Data/, DATA/metas/intra_test/), live vs spoof faces, also scored by EER",
    )
    g.add_argument("--download", default=False, action=Switch, help="cifar100: fetch the dataset into --data-path first (once)")
    g.add_argument("--synthetic-size", default=1024, type=int, help="training images of --dataset synthetic")
    g.add_argument("--num-classes", default=None, type=optional(int), help="classes of --dataset synthetic (default 1000)")
    g.add_argument("-b", "--batch-size", default=32, type=int, help="images per gpu, the total batch size is $NGPU x batch_size")
    g.add_argument("-j", "--workers", default=16, type=int, metavar="N", help="number of data loading workers per process")
    g.add_argument(
        "--cache-dataset",
        default=False,
        action=Switch,
        help="imagefolder: keep the file lists of train/ and val/ in OUTPUT_DIR/dataset_cache.json (plain JSON) for a quicker "
        "start, listed again when a class folder changes",
    )
    g.add_argument("--interpolation", default="bilinear", type=str, help="the interpolation method")
    g.add_argument("--val-resize-size", default=256, type=int, help="the resize size used for validation")
    g.add_argument("--val-crop-size", default=224, type=int, help="the central crop size used for validation")
    g.add_argument("--train-crop-size", default=224, type=int, help="the random crop size used for training")
    g.add_argument("--auto-augment", default=None, type=_optional_str, help="auto augment policy: ta_wide, ra, augmix, imagenet, ...")
    g.add_argument("--ra-magnitude", default=9, type=int, help="magnitude of auto augment policy ra")
    g.add_argument("--augmix-severity", default=3, type=int, help="severity of auto augment policy augmix")
    g.add_argument("--random-erase", default=0.0, type=float, help="random erasing probability")
    g.add_argument("--mixup-alpha", default=0.0, type=float, help="mixup alpha")
    g.add_argument("--cutmix-alpha", default=0.0, type=float, help="cutmix alpha")
    g.add_argument("--ra-sampler", default=False, action=Switch, help="use the repeated augmentation sampler")
    g.add_argument("--ra-reps", default=3, type=int, help="number of repetitions for the repeated augmentation sampler")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", default=90, type=int, metavar="N", help="number of total epochs to run")
    g.add_argument("--opt", default="sgd", type=str, help="optimizer: sgd, sgd_nesterov, rmsprop, adamw")
    g.add_argument("--lr", default=0.1, type=float, help="initial learning rate")
    g.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum")
    g.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay", help="weight decay")
    g.add_argument("--norm-weight-decay", default=None, type=optional(float), help="weight decay for normalization layers (default: --wd)")
    g.add_argument("--bias-weight-decay", default=None, type=optional(float), help="weight decay for bias parameters (default: --wd)")
    g.add_argument(
        "--transformer-embedding-decay", default=None, type=optional(float), help="weight decay for embedding parameters (default: --wd)"
    )
    g.add_argument("--label-smoothing", default=0.0, type=float, help="label smoothing")
    g.add_argument("--lr-scheduler", default="steplr", type=str.lower, choices=SCHEDULERS, help="the main schedule, after any warmup")
    g.add_argument("--lr-warmup-epochs", default=0, type=int, help="the number of epochs to warmup")
    g.add_argument("--lr-warmup-method", default="constant", type=str, help="the warmup method: constant or linear")
    g.add_argument("--lr-warmup-decay", default=0.01, type=float, help="the decay for lr")
    g.add_argument("--lr-step-size", default=30, type=int, help="steplr: decrease lr every step-size epochs")
    g.add_argument("--lr-milestones", default=[], type=int, nargs="*", help="multisteplr: decrease lr at these epochs (counted after warmup)")
    g.add_argument("--lr-gamma", default=0.1, type=float, help="decrease lr by a factor of lr-gamma")
    g.add_argument("--lr-min", default=0.0, type=float, help="minimum lr of the cosine schedule")
    g.add_argument("--clip-grad-norm", default=None, type=optional(float), help="the maximum gradient norm (student); none: no clipping")
    g.add_argument("--model-ema", default=False, action=Switch, help="track an exponential moving average of the student")
    g.add_argument("--model-ema-steps", default=32, type=int, help="iterations between EMA updates")
    g.add_argument("--model-ema-decay", default=0.99998, type=float, help="EMA decay factor")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda", type=str, help="cuda or cpu")
    g.add_argument("--amp", default=False, action=Switch, help="automatic mixed precision")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"], help="float16 (with GradScaler) or bfloat16")
    g.add_argument("--channels-last", default=False, action=Switch, help="student and teacher in channels_last memory format")
    g.add_argument("--compile", default=False, action=Switch, help="torch.compile the student and the teacher")
    g.add_argument("--sync-bn", default=False, action=Switch, help="use sync batch norm in the student")
    g.add_argument("--use-deterministic-algorithms", default=False, action=Switch, help="forces the use of deterministic algorithms only")
    g.add_argument("--seed", default=0, type=int, help="seed of weights, sampler and augmentation")
    g.add_argument("--print-freq", default=10, type=int, help="print frequency (iterations)")
    g.add_argument("--output-dir", default=".", type=str, help="path to save outputs")
    g.add_argument(
        "--start-over",
        default=False,
        action=Switch,
        help="start afresh in an --output-dir that holds a run: its files move into OUTPUT_DIR/previous-<time>/",
    )
    g.add_argument(
        "--max-loss-growth",
        default=1000.0,
        type=float,
        help="refuse to save a checkpoint when an epoch's mean training loss is this many times the run's loss scale: the "
        "largest of ln(classes), the first step's loss and every earlier epoch's mean (0: no check)",
    )
    g.add_argument(
        "--resume", default="", type=str, help="path of checkpoint, or auto: OUTPUT_DIR/checkpoint.pth if there is one, else a fresh start"
    )
    g.add_argument(
        "--checkpoint-freq", default=10, type=int, help="also keep model_{epoch}.pth every this many epochs (checkpoint.pth is always the last)"
    )
    g.add_argument("--start-epoch", default=0, type=int, metavar="N", help="start epoch")
    g.add_argument("--test-only", default=False, action=Switch, help="only evaluate the student (and its EMA)")
    g.add_argument(
        "--eval-views", default=False, action=Switch,
        help="also evaluate on every validation image under each view of --eval-views-protocol (Figure 3 C4/C5)",
    )
    g.add_argument(
        "--eval-views-protocol", default="corruptions", choices=sorted(VIEW_PROTOCOLS),
        help="corruptions: blur, JPEG, pixelate, elastic, posterize, unlike training (cakd.corruptions); "
        "train_views: the multi-view generator's training transforms (not the paper's protocol)",
    )
    g.add_argument("--iters-per-epoch", default=0, type=int, help="stop each epoch after this many iterations (0: all)")
    g.add_argument("--dist-url", default="env://", type=str, help="url used to set up distributed training")

    add_distiller_flags(p)
    return p


def add_distiller_flags(p):
    """A flag per field of every registered recipe's config, with its comment as the help text."""
    g = p.add_argument_group(
        "distiller",
        "loss weights and switches; unset (or none) means the recipe's released value. In the cakd recipe lambda(epoch) "
        "also multiplies the weighted distillation terms (--lambda-scope says which)",
    )
    meanings, choices = distiller_option_meanings(), config_choices()
    builtin = {f.name for m in DISTILLERS.values() if m.__module__.startswith("cakd.") for f in dataclasses.fields(m.config_class)}
    for field in distiller_option_fields():
        default = f"the released {field.default!r}" if field.name in builtin else repr(field.default)
        text = f"{meanings.get(field.name, field.name.replace('_', ' '))} (default: {default})"
        if field.name in choices:  # checked by the distiller's config, so a saved null still loads
            text += f"; one of {', '.join(choices[field.name])}"
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            g.add_argument(flag, default=None, action=Switch, help=text)
        else:
            kind = {int: int, "int": int, str: str, "str": str}.get(field.type, float)
            g.add_argument(flag, default=None, type=kind if kind is str else optional(kind), help=text)


# what a distiller number weighs, where the field's comment in cakd/distillers/ does not say it
MEANINGS = {
    "lambda_span": "ramp: epochs from lambda_start until lambda reaches lambda_max",
    "lambda_max": "ramp: the top of lambda, the weight of the distillation terms",
    "pca_head_dim": "released attention projector: width of each head (maps scaled by its -1/2 power)",
    "gl_window": "group-wise projector: a group is a window of this many tokens a side",
    "gl_batched": "group-wise projector as one batched matmul (false: a loop over the groups; same numbers)",
    "lambda_constant": "lambda_form constant: lambda, the weight of the distillation terms, at every epoch",
}


def distiller_option_meanings():
    """Each distiller field's meaning: its comment in the config dataclass (one source), else MEANINGS."""
    found = dict(MEANINGS)
    for recipe in DISTILLERS.values():
        for line in inspect.getsource(recipe.config_class).splitlines():
            match = re.match(r"\s+(\w+): \w+ = [^#]*#\s*(.*)$", line)
            if match and match.group(1) not in found:
                name, text = match.groups()
                if name.endswith("_weight") and "weight" not in text:
                    text = "weight of " + text
                found[name] = "on/off: " + text if name.startswith("use_") else text
    return found


def _known_keys(parser):
    keys = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        keys[action.dest] = action
        for option in action.option_strings:
            keys[option.lstrip("-").replace("-", "_")] = action
    return keys


def load_yaml(path, parser, _seen=()):
    """YAML values as parser defaults, keyed by dest. Unknown keys are an error.

    A ``config: other.yaml`` key (a path relative to this file; or a list of them, later ones
    winning) loads those files first, and this one's values win: the ablation configs are the
    paper's set-up plus a few keys.
    """
    if not os.path.isfile(path):
        parser.error(f"config file {path} does not exist")
    if os.path.abspath(path) in _seen:
        parser.error(f"config file {path} includes itself through its config: keys")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            parser.error(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}")
    if not isinstance(data, dict):
        parser.error(f"config file {path} must be a mapping of flag names to values")
    data.pop("world_size", None)  # the process count a saved run had: torchrun sets it, not a flag
    defaults = {}
    parents = data.pop("config", None) or []
    for parent in [parents] if isinstance(parents, str) else parents:
        parent = os.path.join(os.path.dirname(path), str(parent))
        defaults.update(load_yaml(parent, parser, _seen + (os.path.abspath(path),)))
    known = _known_keys(parser)
    unknown = sorted(key for key in data if str(key).replace("-", "_") not in known)
    if unknown:
        near = [nearest(str(key).replace("-", "_"), list(known)) for key in unknown]
        hint = "; ".join(f"{key}: did you mean {n}?" for key, n in zip(unknown, near) if n) or "keys are the flags' names"
        parser.error(f"config file {path} has unknown key(s) {', '.join(map(str, unknown))} ({hint})")
    for key, value in data.items():
        action = known[str(key).replace("-", "_")]
        if isinstance(action, argparse._AppendAction):  # plugin: a name or a list, added to the included files'
            value = defaults.get(action.dest, []) + ([value] if isinstance(value, str) else list(value or []))
        elif isinstance(value, str) and action.type is not None:
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            parser.error(f"config file {path}: {key}={value!r} is not one of {', '.join(map(str, action.choices))}")
        defaults[action.dest] = value
    return defaults


def parse_flags(parser, argv, refused):
    """``argv`` over its ``--config`` YAML over the parser's defaults, then every ``refused``
    ``(flag, test, what to give instead)`` checked: one ``error:`` line and exit 2 for a value that
    cannot mean what it says, before anything is built. Both trainers parse through it."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_yaml(pre.config, parser))
    args = parser.parse_args(argv)
    for flag, wrong, meaning in refused:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and wrong(value):
            parser.error(f"{flag} {value}: {meaning}")
    return args


def mark_this_command(parser, args):
    """Mark in ``parser``'s help each flag whose value in ``args`` is not its default."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and action.dest not in ("help", "config") and value != action.default:
            action.help = f"{action.help} [this command: {str(value).replace('%', '%%')}]"


def print_help(argv):
    """``--help`` that also says what this command line runs: each flag its ``--config`` YAML or
    its other flags set is marked ``[this command: VALUE]``, so an experiment script's ``--help``
    shows the recipe it launches, not only the bare defaults."""
    parser = get_args_parser()
    args = parse_args([arg for arg in argv if arg not in ("-h", "--help")])
    mark_this_command(parser, args)
    if args.config:
        parser.description += f". Values marked [this command: ...] are what this command line runs ({args.config} and its flags)"
    parser.print_help()


def import_plugins(argv):
    """Import the ``--plugin`` modules of ``argv`` and of its ``--config`` YAML, before any parser is
    built from the registries; one ``error:`` line and exit 2 when one cannot be imported."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    config = pre.parse_known_args(argv)[0].config
    try:
        load_plugins(plugins_in(argv, [config] if config else []))
    except PluginError as error:
        get_args_parser().error(str(error))


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    import_plugins(argv)
    if "-h" in argv or "--help" in argv:
        print_help(argv)
        sys.exit(0)
    parser = get_args_parser()
    args = parse_flags(parser, argv, REFUSED)
    if "nesterov" in args.opt.lower() and args.momentum == 0:  # torch.optim.SGD refuses it, after the models are built
        parser.error(f"--opt {args.opt} with --momentum 0: Nesterov momentum needs a momentum above 0; give one, or use --opt sgd")
    return args


# values that cannot mean what they say: (flag, test, what to give instead)
REFUSED = (
    ("--print-freq", lambda v: v < 1, "it must be 1 or more (iterations between progress lines)"),
    ("--clip-grad-norm", lambda v: v <= 0, "it would clip every gradient to zero; give a norm above 0, or none for no clipping"),
    ("--model-ema-steps", lambda v: v < 1, "it must be 1 or more (iterations between EMA updates)"),
    ("--checkpoint-freq", lambda v: v < 1, "it must be 1 or more (epochs between kept model_{epoch}.pth files)"),
    ("--ra-reps", lambda v: v < 1, "it must be 1 or more (repetitions of each image per epoch)"),
    ("--batch-size", lambda v: v < 1, "it must be 1 or more (images per process)"),
    ("--workers", lambda v: v < 0, "it must be 0 or more (0: load the data in the training process)"),
    ("--iters-per-epoch", lambda v: v < 0, "it must be 0 or more (0: the whole epoch)"),
    # what torch and torchvision refuse only once the models are built (or mid-epoch), said before
    ("--opt", lambda v: not v.lower().startswith("sgd") and v.lower() not in ("rmsprop", "adamw"),
     "not an optimizer: use sgd, sgd_nesterov, rmsprop or adamw"),
    ("--lr", lambda v: v < 0, "a learning rate cannot be negative; give 0 or more"),
    ("--lr-min", lambda v: v < 0, "a learning rate cannot be negative; give 0 or more"),
    ("--momentum", lambda v: v < 0, "a momentum cannot be negative; give 0 or more (0.9: the recipes')"),
    ("--weight-decay", lambda v: v < 0, "a weight decay cannot be negative; give 0 or more"),
    ("--norm-weight-decay", lambda v: v < 0, "a weight decay cannot be negative; give 0 or more, or none for --wd"),
    ("--bias-weight-decay", lambda v: v < 0, "a weight decay cannot be negative; give 0 or more, or none for --wd"),
    ("--transformer-embedding-decay", lambda v: v < 0, "a weight decay cannot be negative; give 0 or more, or none for --wd"),
    ("--label-smoothing", lambda v: not 0 <= v <= 1, "it must be between 0 and 1 (0: none, 0.1: the usual)"),
    ("--lr-warmup-decay", lambda v: not 0 < v <= 1, "it must be above 0 and at most 1 (the warmup's first lr over --lr)"),
    ("--model-ema-decay", lambda v: not 0 <= v <= 1, "it must be between 0 and 1"),
    ("--random-erase", lambda v: not 0 <= v <= 1, "it is a probability: between 0 and 1"),
    ("--mixup-alpha", lambda v: v < 0, "it must be 0 (off) or more"),
    ("--cutmix-alpha", lambda v: v < 0, "it must be 0 (off) or more"),
    ("--ra-magnitude", lambda v: not 0 <= v <= 30, "RandAugment's magnitude is a bin from 0 to 30"),
    ("--augmix-severity", lambda v: not 1 <= v <= 10, "AugMix's severity is from 1 to 10"),
)


def distiller_overrides(args):
    """The distiller options set on the command line or in YAML, plus label smoothing."""
    overrides = {f.name: getattr(args, f.name) for f in distiller_option_fields() if getattr(args, f.name) is not None}
    overrides["label_smoothing"] = args.label_smoothing
    return overrides


def saved_args(args):
    """The flags a run is trained with (what ``config.yaml`` and a checkpoint keep)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SAVED}


def save_config(args, path):
    """The effective configuration, loadable again with ``--config``."""
    write_text_atomic(path, yaml.safe_dump(saved_args(args), sort_keys=True))


def amp_dtype(args):
    """The autocast dtype of ``--amp --amp-dtype`` (None without ``--amp``)."""
    return getattr(torch, args.amp_dtype) if args.amp else None
