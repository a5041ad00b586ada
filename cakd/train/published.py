"""The numbers a run is compared with: the released code's README, the paper's Tables 1-3 and
Figure 3(a), and Table 4's anti-spoofing EERs (:func:`published_eer`).

:func:`published` looks a run up by dataset, recipe, student and teacher. Top-1 / top-5 in %;
the paper's Table 1 (CIFAR-100) gives top-1 only. The CAKD cells (recipe ``cakd``) are the
paper's method; the released recipe shares the key, its own figure marked ``released README``.
:func:`figure3_column` tells an ablation run's column by its flags, :func:`figure3` its number.
"""
import dataclasses

from ..distillers import DISTILLERS

RELEASED = "released README"  # ImageNet val, the released recipes (docs/reference.md)
PAPER = "paper"  # Liu et al., ACCV 2022, Tables 1-3 (docs/paper.md)

_TABLE3_TEACHERS = ("vit_b_16", "vit_l_16", "deit_b", "swin_b", "swin_l")
_TABLE3_STUDENTS = ("resnet50", "resnet18", "mobilenet_v2", "efficientnet_b0")
# Table 3, CAKD: one row per teacher, students in the order above
_TABLE3 = (
    ((78.34, 94.06), (71.73, 90.41), (73.34, 91.01), (79.23, 94.50)),
    ((78.85, 94.31), (72.02, 90.52), (73.52, 91.18), (79.34, 94.54)),
    ((78.53, 94.13), (71.85, 90.45), (73.40, 91.06), (79.30, 94.52)),
    ((78.87, 94.29), (72.01, 90.52), (73.56, 91.21), (79.38, 94.55)),
    ((78.96, 94.42), (72.09, 90.57), (73.66, 91.25), (79.52, 94.60)),
)

# Table 2 (ImageNet) and Table 1 (CIFAR-100), the Transformer -> CNN blocks: one row per pair,
# the columns Logits (Hinton KD: recipe kd), RKD, IRG and CAKD (the paper's method: recipe cakd)
_TABLES_RECIPES = ("kd", "rkd", "irg", "cakd")
_TABLE2 = {
    ("resnet50", "vit_b_16"): ((77.02, 93.40), (77.27, 93.50), (77.39, 93.55), (78.34, 94.06)),
    ("resnet50", "vit_l_16"): ((77.45, 93.57), (77.82, 93.75), (77.75, 93.71), (78.85, 94.31)),
    ("resnet50x2", "vit_b_16"): ((79.02, 94.62), (79.68, 94.82), (79.60, 94.79), (80.72, 95.38)),
    ("resnet50x2", "vit_l_16"): ((79.31, 94.72), (79.78, 94.85), (79.83, 94.88), (81.01, 95.46)),
    ("resnet50", "swin_l"): ((77.60, 93.64), (77.85, 93.76), (77.89, 93.79), (78.96, 94.42)),
    ("resnet50x2", "swin_l"): ((79.68, 94.83), (79.92, 94.92), (80.10, 94.99), (81.39, 95.64)),
}
_TABLE1 = {
    ("resnet50", "vit_b_16"): (86.42, 86.13, 86.59, 87.39),
    ("resnet50", "vit_l_16"): (86.69, 86.73, 86.91, 88.09),
    ("resnet50x2", "vit_b_16"): (88.86, 89.11, 89.38, 90.33),
    ("resnet50x2", "vit_l_16"): (89.28, 89.51, 89.68, 90.97),
    ("resnet50", "swin_l"): (86.78, 86.91, 87.06, 88.46),
    ("resnet50x2", "swin_l"): (88.93, 90.02, 89.97, 91.21),
}
# Figure 3(a), ImageNet top-1 read off the plot (about +-0.05): C1 "Logits" (recipe kd), C2 + group-wise
# projector, C3 + attention projector, C4 = C3 evaluated with noise, C5 + robust training evaluated
# with noise, C6 the full method, clean (configs/ablation_*.yaml, cakd_paper.yaml; docs/FIDELITY.md)
FIGURE3_COLUMNS = ("C1", "C2", "C3", "C4", "C5", "C6")
FIGURE3 = {
    ("resnet50", "vit_b_16"): (77.0, 77.15, 77.9, 77.3, 78.2, 78.3),
    ("resnet50", "vit_l_16"): (77.45, 77.55, 78.35, 77.8, 78.7, 78.85),
    ("resnet50x2", "vit_b_16"): (79.0, 79.3, 80.25, 79.75, 80.7, 80.7),
    ("resnet50x2", "vit_l_16"): (79.3, 79.75, 80.5, 80.1, 80.95, 81.0),
}

# (dataset, recipe, student, teacher) -> [(source, top-1, top-5)]; teacher None: the student alone
PUBLISHED = {
    ("imagenet", "baseline", "resnet50", None): [(RELEASED, 73.82, 91.97), (PAPER, 76.28, 93.03)],
    ("imagenet", "baseline", "resnet50x2", None): [(PAPER, 78.16, 93.91)],
    ("imagenet", "baseline", "resnet18", None): [(PAPER, 69.76, 89.08)],
    ("imagenet", "baseline", "mobilenet_v2", None): [(PAPER, 71.88, 90.29)],
    ("imagenet", "baseline", "efficientnet_b0", None): [(PAPER, 77.69, 93.53)],
    # the released logits recipe is an MSE on logits; the paper's "Logits" column is Hinton KD (recipe kd)
    ("imagenet", "logits", "resnet50", "vit_b_16"): [(RELEASED, 74.48, 92.29)],
    ("imagenet", "cakd", "resnet50", "vit_b_16"): [(RELEASED, 76.21, 93.09)],
    # Table 1: the fine-tuned teachers (step 1 of experiments/run_cifar100.sh) and the students alone
    ("cifar100", "baseline", "vit_b_16", None): [(PAPER, 90.92, None)],
    ("cifar100", "baseline", "vit_l_16", None): [(PAPER, 92.46, None)],
    ("cifar100", "baseline", "swin_l", None): [(PAPER, 93.78, None)],
    ("cifar100", "baseline", "resnet50", None): [(PAPER, 85.02, None)],
    ("cifar100", "baseline", "resnet50x2", None): [(PAPER, 88.21, None)],
}


def _add(key, top1, top5):
    """One paper number; Table 3 repeats Table 2's ResNet-50 CAKD cells, kept once."""
    entries = PUBLISHED.setdefault(key, [])
    if (PAPER, top1, top5) not in entries:
        entries.append((PAPER, top1, top5))


for (_student, _teacher), _row in _TABLE2.items():
    for _recipe, (_top1, _top5) in zip(_TABLES_RECIPES, _row):
        _add(("imagenet", _recipe, _student, _teacher), _top1, _top5)
for (_student, _teacher), _row in _TABLE1.items():
    for _recipe, _top1 in zip(_TABLES_RECIPES, _row):
        _add(("cifar100", _recipe, _student, _teacher), _top1, None)
for _teacher, _row in zip(_TABLE3_TEACHERS, _TABLE3):
    for _student, (_top1, _top5) in zip(_TABLE3_STUDENTS, _row):
        _add(("imagenet", "cakd", _student, _teacher), _top1, _top5)


# Table 4, face anti-spoofing on CelebA-Spoof, EER % (lower is better), one row per student in the
# columns below
TABLE4_SPOOF_COLUMNS = ("Baseline", "Logits (T = ResNet152x2)", "Logits (T = ViT-L/16)", "CAKD (T = ViT-L/16)")
TABLE4_SPOOF = {"resnet18": (1.6, 1.6, 1.6, 1.3), "inception_v3": (1.4, 1.3, 1.4, 1.1), "resnext26": (1.3, 1.3, 1.3, 0.9)}


def published_eer(recipe, student, teacher=None):
    """``(column, EER %)`` of Table 4's anti-spoofing cell of a CelebA-Spoof run, or None: the
    student alone (recipe baseline), Hinton KD (recipe kd, the paper's "Logits") from ResNet152x2
    or ViT-L/16, or CAKD from ViT-L/16."""
    row = TABLE4_SPOOF.get(student)
    if row is None:
        return None
    if recipe == "baseline":
        column = 0
    elif teacher == "resnet152x2" and recipe == "kd":
        column = 1
    elif teacher == "vit_l_16" and recipe in ("kd", "cakd"):
        column = 2 if recipe == "kd" else 3
    else:
        return None
    return TABLE4_SPOOF_COLUMNS[column], row[column]


def published(dataset, recipe, student, teacher=None):
    """``[(source, top1, top5)]`` for a run; ``dataset`` is the trainer's flag (an image folder
    is taken to be ImageNet). A student alone (the baseline) is keyed without a teacher."""
    dataset = "imagenet" if dataset in (None, "imagefolder") else dataset
    return PUBLISHED.get((dataset, recipe, student, teacher)) or PUBLISHED.get((dataset, recipe, student, None), [])


# Figure 3's trained columns as the flags that make them (configs/ablation_*.yaml, cakd_paper.yaml);
# C4 and C5 are C3 and C6 evaluated with noise
FIGURE3_RUNS = {
    "C1": {"recipe": "kd"},
    "C2": {"recipe": "cakd", "logits_form": "kd", "use_pca": False, "use_adv": False},
    "C3": {"recipe": "cakd", "logits_form": "kd", "use_pca": True, "pca_form": "paper", "use_adv": False},
    "C6": {"recipe": "cakd", "logits_form": "kd", "use_pca": True, "pca_form": "paper", "use_adv": True, "disc_form": "mlp",
           "multiview": True},
}


def figure3_column(config):
    """Which of Figure 3's trained columns a run's flags (its ``config.yaml``) are: ``"C1"``
    (Hinton KD), ``"C2"``, ``"C3"`` (also C4 with noise) or ``"C6"`` (also C5 with noise); None
    for any other run (the released CAKD recipe among them). A distiller flag the run left unset
    (saved as null) is its recipe's released value."""
    recipe = config.get("recipe")
    defaults = dataclasses.asdict(DISTILLERS[recipe].config_class()) if recipe in DISTILLERS else {}
    flags = {**defaults, **{key: value for key, value in config.items() if value is not None}}
    flags["multiview"] = (flags.get("multiview_prob") or 0) > 0
    return next((column for column, wanted in FIGURE3_RUNS.items() if all(flags.get(k) == v for k, v in wanted.items())), None)


def figure3(student, teacher, column):
    """Figure 3's top-1 for ``column`` of a pair, and the noisy column beside it (C4 for C3, C5
    for C6), ``[(label, top1)]``; empty for a pair the figure does not have."""
    row = FIGURE3.get((student, teacher))
    if row is None or column is None:
        return []
    shown = {"C1": ("C1",), "C2": ("C2",), "C3": ("C3", "C4"), "C6": ("C6", "C5")}[column]
    labels = {"C4": "C4 with noise", "C5": "C5 with noise"}
    return [(labels.get(c, c), row[FIGURE3_COLUMNS.index(c)]) for c in shown]
