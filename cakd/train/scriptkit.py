"""The scripts' kit, what the scripts around a run share (``scripts/*.py``): their common flags, declared once;
"whatever the user points at" (:class:`checkpoints.SourceCheckpoint`) as a student, its EMA, its
projectors or its teacher; the validation folder with the recipe's eval preset. Each script's
``main`` is ``run_and_report(run, parser.parse_args(argv))`` (:func:`report.run_and_report`).
"""
import os

import torch
from torchvision.transforms import InterpolationMode

from ..weights import load_strict
from ..distillers import build_distiller
from ..students import CNN_STUDENTS, classifier_key, num_classes_of
from ..zoo import architecture, build_student, build_teacher, no_weights, student_names
from .config import distiller_option_fields, get_args_parser
from .data import ClassificationPresetEval, DataError, ImageFolder, check_data_path
from .report import UserError, one_line

# The eval preset of the three recipes (configs/*.yaml, not the parser's --val-resize-size 256),
# for files that carry no flags.
RECIPE_EVAL = {"val_resize_size": 224, "val_crop_size": 224, "interpolation": "bilinear"}
# The trainer's defaults for what a file does not say, read from its parser: written once, there.
DEFAULTS = {name: get_args_parser().get_default(name) for name in
            ("model", "teacher", "teacher_weights", "batch_size", "seed", "train_crop_size", "print_freq", "eval_views_protocol")}

# The flags the scripts share: one spelling, alias, default and meaning everywhere. A value left
# out is the run's (the flag saved in the checkpoint), else the recipes' (:func:`pick`).
SHARED_FLAGS = {
    "checkpoint": (("--checkpoint",), dict(
        default=None, help="a training checkpoint (checkpoint.pth, model_N.pth), an exported student .pth or a released-code checkpoint")),
    "data_path": (("--data-path",), dict(
        default=None, help="folder with val/<class>/, or the val folder itself (default: the run's)")),
    "model": (("--model", "--student"), dict(
        dest="model", default=None, help=f"student architecture (default: the run's, else inferred from the weights, else {DEFAULTS['model']})")),
    "teacher": (("--teacher",), dict(default=None, help=f"teacher architecture (default: the run's, else {DEFAULTS['teacher']})")),
    "teacher_weights": (("--teacher-weights",), dict(
        default=None, help=f"IMAGENET1K_V1, a .pth file, or none (default: the run's, else {DEFAULTS['teacher_weights']})")),
    # where there is a GPU it is what a user wants; where there is none, the only choice
    "device": (("--device",), dict(
        default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda when one is visible, else cpu)")),
}


def add_shared_flags(parser, *names, required=(), **meanings):
    """Declare the shared flags ``names`` (keys of :data:`SHARED_FLAGS`) on ``parser``. Those in
    ``required`` must be given; ``meanings``: a script's own help for a flag (its default stays)."""
    for name in names:
        spellings, options = SHARED_FLAGS[name]
        options = {**options, "help": meanings.get(name, options["help"]), **({"required": True} if name in required else {})}
        parser.add_argument(*spellings, **options)


def pick(checkpoint, name, flag=None):
    """A value given on the command line, else the run's own flag (when ``checkpoint`` has
    one), else the recipes' (:data:`RECIPE_EVAL`, :data:`DEFAULTS`)."""
    if flag is not None:
        return flag
    if checkpoint is not None and checkpoint.args.get(name) is not None:
        return checkpoint.args[name]
    return RECIPE_EVAL.get(name, DEFAULTS.get(name))


def load_student(checkpoint, which="student", model=None):
    """A torchvision model in eval mode holding the checkpoint's student (or EMA) weights.

    The architecture is ``model``, else the run's ``--model``, else the CNN whose keys and
    shapes the weights have, else resnet50; the class count is read from its classifier.
    """
    state = checkpoint.student_state(which)
    arch = student_arch(checkpoint, model, state)
    if arch not in student_names():
        raise UserError(f"unknown student {arch!r}: choose one of {', '.join(student_names())}")
    with torch.device("meta"):
        head = classifier_key(architecture(arch)) + ".weight"
    if head not in state:
        raise UserError(f"{checkpoint.path}: its {which} weights have no {head}, so they are not a {arch}: pass --model")
    student = build_student(arch, num_classes=state[head].shape[0], image_size=pick(checkpoint, "train_crop_size"))
    load_strict(student, state, f"{checkpoint.path} does not fit a {arch} student", "pass --model with the student it was trained as")
    return student.eval()


def student_arch(checkpoint, model=None, state=None):
    """The student's architecture: ``model``, else the run's ``--model``, else the CNN whose
    keys and shapes the weights have (an exported file says nothing else about itself), else resnet50."""
    if model is None and "model" not in checkpoint.args:
        model = infer_student(state if state is not None else checkpoint.student_state("student"))
    return pick(checkpoint, "model", model)


def infer_student(state):
    """The one CNN student whose state dict has exactly these keys and shapes (built on the
    meta device: no memory, no init cost; a few seconds for all of them), or None."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    found = []
    for name in CNN_STUDENTS:
        with torch.device("meta"):
            candidate = architecture(name)
            head = classifier_key(candidate) + ".weight"
            if head not in state:
                continue
            candidate = architecture(name, num_classes=state[head].shape[0])
        if {key: tuple(value.shape) for key, value in candidate.state_dict().items()} == shapes:
            found.append(name)
    return found[0] if len(found) == 1 else None


def rebuild_distiller(checkpoint, recipe=None, model=None, teacher=None, teacher_weights=None):
    """The distiller as the trainer built it, from all the checkpoint saved: its recipe and
    every distiller switch, the student's trained weights, its projectors, and the teacher
    (its weights, or the run's random teacher drawn again from the run's seed), at the
    training crop. ``recipe`` asks for another recipe's structure around the student (e.g.
    ``cakd`` taps on a baseline run's student): projectors are then left untrained.
    Returns ``(distiller in eval mode, teacher description)``."""
    saved = checkpoint.recipe()
    recipe = recipe or saved
    student = load_student(checkpoint, "student", model)
    image_size = pick(checkpoint, "train_crop_size")
    name, weights = pick(checkpoint, "teacher", teacher), pick(checkpoint, "teacher_weights", teacher_weights)
    built = build_eval_teacher(
        name, weights, image_size, num_classes_of(student), seed=pick(checkpoint, "seed"), student=pick(checkpoint, "model", model)
    )
    fields = {f.name for f in distiller_option_fields()} | {"label_smoothing"}  # what the trainer passes
    overrides = {k: v for k, v in checkpoint.args.items() if k in fields and v is not None} if recipe == saved else {}
    try:
        distiller = build_distiller(recipe, student, built, image_size=image_size, **overrides)
    except ValueError as error:
        raise UserError(f"{checkpoint.path}: {error}") from None
    projectors = checkpoint.projector_state() if recipe == saved else {}
    if projectors:
        state = distiller.trainable.joined(student.state_dict(), projectors)
        load_strict(distiller.trainable, state, f"{checkpoint.path}: its projectors do not fit the rebuilt distiller", "pass the run's --teacher")
    return distiller.eval(), f"{name} ({weights})"


def build_eval_teacher(name, weights, image_size, num_classes, seed=None, student=None):
    """The teacher as the trainer builds it, in eval mode.

    ``weights`` None or "none" is a random teacher: drawn with ``seed`` after a ``student``
    of the same class count, as the trainer draws it, so a run's random teacher comes back
    exactly when ``image_size`` is the run's training crop.
    """
    try:
        if no_weights(weights) and seed is not None:
            torch.manual_seed(seed)
            if student is not None:
                build_student(student, num_classes=num_classes)
        return build_teacher(name, "none" if no_weights(weights) else weights, image_size=image_size, num_classes=num_classes)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise UserError(str(error)) from None


def check_output(output, source, force, what="the input"):
    """``output`` may be written: it is not ``source`` and, unless ``force``, does not exist."""
    if os.path.exists(output) and os.path.abspath(output) == os.path.abspath(source):
        raise UserError(f"--output {output} is {what} itself: choose another file")
    if os.path.exists(output) and not force:
        raise UserError(f"{output} exists: pass --force to overwrite it")


def val_folder(data_path):
    """``DATA/val`` of a training data path, or ``data_path`` itself when it is a folder of classes."""
    check_data_path(data_path, "pass --data-path, a folder with val/<class>/ images or the val folder itself")
    val = os.path.join(data_path, "val")
    if os.path.isdir(val):
        return val
    if os.path.isdir(os.path.join(data_path, "train")):
        raise DataError(f"{data_path} has train/ but no val/ folder: evaluation reads DATA/val/<class>/ images")
    return data_path


def build_val_dataset(data_path, resize_size, crop_size, interpolation="bilinear"):
    """The validation ImageFolder with the recipe's eval preset (resize, center crop, normalize)."""
    folder = val_folder(data_path)
    try:
        interpolation = InterpolationMode(interpolation)
    except ValueError:
        raise UserError(f"unknown interpolation {interpolation!r}: use bilinear, bicubic or nearest") from None
    transform = ClassificationPresetEval(crop_size=crop_size, resize_size=resize_size, interpolation=interpolation)
    try:
        dataset = ImageFolder(folder, transform=transform)
    except FileNotFoundError as error:
        raise DataError(f"{folder} holds no usable class folders ({one_line(error)}): expected {folder}/<class>/*.JPEG") from None
    return dataset


def training_crop_val_dataset(checkpoint, student, data_path=None, resize_size=None):
    """The run's validation images at its training crop (the distiller's token grid), their
    class count checked against ``student``'s: what the maps and features are drawn from."""
    dataset = build_val_dataset(
        pick(checkpoint, "data_path", data_path), pick(checkpoint, "val_resize_size", resize_size),
        pick(checkpoint, "train_crop_size"), pick(checkpoint, "interpolation"),
    )
    check_class_count(num_classes_of(student), dataset, checkpoint.path)
    return dataset


def check_class_count(num_classes, dataset, what):
    found = len(dataset.classes)
    if num_classes != found:
        raise UserError(
            f"{what} predicts {num_classes} classes but {dataset.root} has {found} class folders: "
            "evaluate on the dataset it was trained for"
        )
