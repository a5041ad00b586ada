"""The detection trainer's flags (torchvision's ``references/detection`` names where it has them),
with the classification trainer's YAML loading, help formatting and one-line parse errors.
Defaults are the 1x schedule of docs/FIDELITY.md."""
import sys

from ..train.config import ArgumentParser, HelpFormatter, Switch, _optional_str, mark_this_command, optional, parse_flags
from .models import BACKBONES, DETECTORS


def get_args_parser():
    p = ArgumentParser(
        prog="python -m cakd.detection",
        usage="%(prog)s [--config FILE.yaml] [--flag value ...]   (or python -m cakd.train.launch ... -m cakd.detection ...)",
        description="Faster R-CNN / Mask R-CNN (torchvision's) on COCO 2017 with a distilled ResNet backbone: the paper's Table 4",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", default=None, type=str, help="YAML file of flag values (the command line wins)")
    g = p.add_argument_group("model")
    g.add_argument("--detector", default="fasterrcnn", choices=sorted(DETECTORS), help="fasterrcnn (box AP) or maskrcnn (box and mask AP)")
    g.add_argument("--backbone", default="resnet50", choices=BACKBONES, metavar="NAME", help=f"the FPN backbone's ResNet: {', '.join(BACKBONES)}")
    g.add_argument(
        "--backbone-weights", default="IMAGENET1K_V1", type=_optional_str,
        help="the backbone's weights, loaded into the body strictly: a cakd training checkpoint, a scripts/export.py file, a "
        "torchvision weights name of --backbone, or none (random)",
    )
    g.add_argument("--trainable-backbone-layers", default=3, type=int, choices=range(6), metavar="N",
                   help="backbone stages trained, from the last (3: the stem and layer1 stay frozen; 0-5)")
    g.add_argument("--frozen-bn", default=True, action=Switch,
                   help="the backbone's BatchNorm frozen at its weights' statistics (off: trained, for a backbone from scratch)")
    g.add_argument("--rpn-post-nms-top-n-train", default=2000, type=int, help="proposals per image kept for training")
    g.add_argument("--rpn-post-nms-top-n-test", default=1000, type=int, help="proposals per image kept for evaluation")
    g.add_argument("--box-detections-per-img", default=100, type=int, help="detections kept per image (COCO's maxDets is 100)")
    g.add_argument("--box-batch-size-per-image", default=512, type=int, help="proposals per image sampled for the box head's loss")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default="/datasets01/COCO/022719/", type=str, help="COCO 2017: train2017/, val2017/, annotations/")
    g.add_argument("--min-size", default=800, type=int, help="shorter image side after resizing (the detector's transform)")
    g.add_argument("--max-size", default=1333, type=int, help="longer image side at most")
    g.add_argument("-b", "--batch-size", default=2, type=int, help="images per process; the total is processes x batch-size")
    g.add_argument("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers per process")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", default=12, type=int, metavar="N", help="number of total epochs to run")
    g.add_argument("--lr", default=0.02, type=float, help="learning rate at --lr-batch images per step (scaled linearly to the run's)")
    g.add_argument("--lr-batch", default=16, type=int, help="the total batch --lr is given for")
    g.add_argument("--momentum", default=0.9, type=float, metavar="M", help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W", dest="weight_decay", help="weight decay")
    g.add_argument("--lr-warmup-iters", default=1000, type=int, help="iterations of linear warmup")
    g.add_argument("--lr-warmup-factor", default=0.001, type=float, help="the lr factor the warmup starts from")
    g.add_argument("--lr-steps", default=[8, 11], type=int, nargs="*", help="epochs at which the lr is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", default=0.1, type=float, help="the lr step's factor")
    g.add_argument("--clip-grad-norm", default=None, type=optional(float), help="the maximum gradient norm; none: no clipping")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda", type=str, help="cuda or cpu")
    g.add_argument("--amp", default=False, action=Switch, help="automatic mixed precision")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"], help="float16 (with GradScaler) or bfloat16")
    g.add_argument("--seed", default=0, type=int, help="seed of weights, sampler and flips")
    g.add_argument("--print-freq", default=20, type=int, help="print frequency (iterations)")
    g.add_argument("--output-dir", default=".", type=str, help="path to save outputs")
    g.add_argument("--start-over", default=False, action=Switch,
                   help="start afresh in an --output-dir that holds a run: its files move into OUTPUT_DIR/previous-<time>/")
    g.add_argument("--resume", default="", type=str,
                   help="path of checkpoint, or auto: OUTPUT_DIR/checkpoint.pth if there is one, else a fresh start")
    g.add_argument("--checkpoint-freq", default=4, type=int, help="also keep model_{epoch}.pth every this many epochs")
    g.add_argument("--start-epoch", default=0, type=int, metavar="N", help="start epoch")
    g.add_argument("--test-only", default=False, action=Switch, help="only evaluate the --resume checkpoint")
    g.add_argument("--iters-per-epoch", default=0, type=int, help="stop each epoch after this many iterations (0: all)")
    g.add_argument("--dist-url", default="env://", type=str, help="url used to set up distributed training")
    return p


# values that cannot mean what they say: (flag, test, what to give instead)
REFUSED = (
    ("--print-freq", lambda v: v < 1, "it must be 1 or more (iterations between progress lines)"),
    ("--batch-size", lambda v: v < 1, "it must be 1 or more (images per process)"),
    ("--workers", lambda v: v < 0, "it must be 0 or more (0: load the data in the training process)"),
    ("--checkpoint-freq", lambda v: v < 1, "it must be 1 or more (epochs between kept model_{epoch}.pth files)"),
    ("--clip-grad-norm", lambda v: v <= 0, "give a norm above 0, or none for no clipping"),
    ("--lr-batch", lambda v: v < 1, "it must be 1 or more (images per step)"),
    ("--iters-per-epoch", lambda v: v < 0, "it must be 0 or more (0: the whole epoch)"),
    # what torch.optim refuses only once the detector is built, said before
    ("--lr", lambda v: v < 0, "a learning rate cannot be negative; give 0 or more"),
    ("--momentum", lambda v: v < 0, "a momentum cannot be negative; give 0 or more (0.9: the 1x schedule's)"),
    ("--weight-decay", lambda v: v < 0, "a weight decay cannot be negative; give 0 or more"),
    ("--lr-warmup-factor", lambda v: v < 0, "the warmup's first lr over --lr cannot be negative; give 0 or more (0.001: the 1x schedule's)"),
)


def parse_args(argv=None):
    """Flags from ``argv`` over the ``--config`` YAML over the defaults; ``--help`` marks what this
    command line sets (``[this command: VALUE]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print_help(argv)
        sys.exit(0)
    return parse_flags(get_args_parser(), argv, REFUSED)


def print_help(argv):
    parser = get_args_parser()
    mark_this_command(parser, parse_args([arg for arg in argv if arg not in ("-h", "--help")]))
    parser.print_help()
