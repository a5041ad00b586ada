"""torchvision's Faster R-CNN and Mask R-CNN on a ResNet FPN backbone whose body takes our weights.

The detectors are torchvision's own classes around ``resnet_fpn_backbone`` (frozen BatchNorm,
``trainable_layers`` of the body trained): ``fasterrcnn`` / ``maskrcnn`` with ``resnet50`` are
``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn``; ``resnet101`` and
``resnext101_32x8d`` go through the same builder. The backbone's weights, from a training
checkpoint of ours, a ``scripts/export.py`` file or a torchvision weights name, are loaded into
the body strictly: the classifier (``fc``) is the only key left out, the FPN and heads start fresh.
"""
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from ..weights import load_strict
from ..zoo import no_weights
from ..train.checkpoints import CheckpointError, SourceCheckpoint
from ..train.report import UserError

DETECTORS = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d")
CLASSIFIER = ("fc.weight", "fc.bias")


def build_detector(detector, backbone, num_classes, trainable_layers=3, min_size=800, max_size=1333, frozen_bn=True, **options):
    """A randomly initialised detector (body, FPN and heads). ``frozen_bn``: the body's BatchNorm
    keeps its weights' statistics (the protocol); off, it trains (a backbone trained from scratch,
    as the tests' is). ``options``: the detector class's own keyword arguments."""
    norm_layer = FrozenBatchNorm2d if frozen_bn else torch.nn.BatchNorm2d
    fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm_layer, trainable_layers=trainable_layers)
    return DETECTORS[detector](fpn, num_classes=num_classes, min_size=min_size, max_size=max_size, **options)


def backbone_state(weights, backbone):
    """``(state dict, description)`` of the classification network named by ``weights``: a
    torchvision weights name of ``backbone`` (``IMAGENET1K_V1`` or ``ResNet50_Weights.IMAGENET1K_V1``),
    or a file (a cakd training checkpoint, an export, a released-code checkpoint). The
    description names the file and, when known, its recipe and architecture."""
    text = str(weights)
    if text.endswith((".pth", ".pt")) or "/" in text:
        try:
            source = SourceCheckpoint(text)
        except CheckpointError as error:
            raise UserError(f"--backbone-weights: {error}") from None
        model = source.args.get("model")
        if model is not None and model != backbone:
            raise UserError(f"--backbone-weights {text} is a {model} (its run's --model), not a {backbone}: pass --backbone {model}")
        what = {"training": "training checkpoint", "released": "released-code checkpoint", "student": "exported student"}[source.kind]
        recipe = f", recipe {source.recipe()}" if source.kind != "student" else ""
        return source.student_state("student"), f"{text} ({what}{recipe}{f', {model}' if model else ''})"
    enum = torchvision.models.get_model_weights(backbone)
    member = enum.__members__.get(text.split(".")[-1]) if text.split(".")[0] in (enum.__name__, text) else None
    if member is None:
        raise UserError(f"--backbone-weights {text}: not a file and not a {backbone} weights name; use a .pth path or one of "
                        f"{', '.join(enum.__members__)}")
    try:
        return member.get_state_dict(progress=False, check_hash=True), f"torchvision {enum.__name__}.{member.name}"
    except Exception as error:  # offline: no usable file
        raise UserError(f"could not download {member.url} ({type(error).__name__}); offline, pass a local .pth as "
                        "--backbone-weights") from None


def load_backbone(detector, state, what):
    """Load a classification state dict into ``detector``'s body strictly (its classifier keys
    dropped): a missing or unexpected key is one :class:`~cakd.weights.StateMismatch` line."""
    body = detector.backbone.body
    state = {key: value for key, value in state.items() if key not in CLASSIFIER}
    load_strict(body, state, f"--backbone-weights {what} does not fit the detector's backbone",
                "pass weights of the --backbone architecture (a ResNet's state dict, classifier aside)")


def initialise(detector, weights, backbone):
    """The body from ``weights`` (none: random); returns the header's words for it."""
    if no_weights(weights):
        return "random backbone"
    state, what = backbone_state(weights, backbone)
    load_backbone(detector, state, what)
    return f"backbone from {what}"
