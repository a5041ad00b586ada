"""The numbers a run is compared with: the released code's README and the paper's tables.

:func:`published` looks a run up by dataset, recipe, student and teacher. Top-1 / top-5 in %;
the paper's Table 1 (CIFAR-100) gives top-1 only.
"""
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

# (dataset, recipe, student, teacher) -> [(source, top-1, top-5)]; teacher None: the student alone
PUBLISHED = {
    ("imagenet", "baseline", "resnet50", None): [(RELEASED, 73.82, 91.97), (PAPER, 76.28, 93.03)],
    ("imagenet", "baseline", "resnet18", None): [(PAPER, 69.76, 89.08)],
    ("imagenet", "baseline", "mobilenet_v2", None): [(PAPER, 71.88, 90.29)],
    ("imagenet", "baseline", "efficientnet_b0", None): [(PAPER, 77.69, 93.53)],
    # the released logits recipe is an MSE on logits; the paper's "Logits" column is Hinton KD (recipe kd)
    ("imagenet", "logits", "resnet50", "vit_b_16"): [(RELEASED, 74.48, 92.29)],
    ("imagenet", "kd", "resnet50", "vit_b_16"): [(PAPER, 77.02, 93.40)],
    ("imagenet", "kd", "resnet50", "vit_l_16"): [(PAPER, 77.45, 93.57)],
    ("imagenet", "kd", "resnet50", "swin_l"): [(PAPER, 77.60, 93.64)],
    ("imagenet", "cakd", "resnet50", "vit_b_16"): [(RELEASED, 76.21, 93.09)],
    # Table 1: the fine-tuned teachers (step 1 of experiments/run_cifar100.sh) and the ResNet-50 student
    ("cifar100", "baseline", "vit_b_16", None): [(PAPER, 90.92, None)],
    ("cifar100", "baseline", "vit_l_16", None): [(PAPER, 92.46, None)],
    ("cifar100", "baseline", "swin_l", None): [(PAPER, 93.78, None)],
    ("cifar100", "baseline", "resnet50", None): [(PAPER, 85.02, None)],
    ("cifar100", "kd", "resnet50", "vit_b_16"): [(PAPER, 86.42, None)],
    ("cifar100", "kd", "resnet50", "vit_l_16"): [(PAPER, 86.69, None)],
    ("cifar100", "kd", "resnet50", "swin_l"): [(PAPER, 86.78, None)],
    ("cifar100", "cakd", "resnet50", "vit_b_16"): [(PAPER, 87.39, None)],
    ("cifar100", "cakd", "resnet50", "vit_l_16"): [(PAPER, 88.09, None)],
    ("cifar100", "cakd", "resnet50", "swin_l"): [(PAPER, 88.46, None)],
}
for _teacher, _row in zip(_TABLE3_TEACHERS, _TABLE3):
    for _student, (_top1, _top5) in zip(_TABLE3_STUDENTS, _row):
        PUBLISHED.setdefault(("imagenet", "cakd", _student, _teacher), []).append((PAPER, _top1, _top5))


def published(dataset, recipe, student, teacher=None):
    """``[(source, top1, top5)]`` for a run; ``dataset`` is the trainer's flag (an image folder
    is taken to be ImageNet). The baseline recipe has no teacher."""
    dataset = "imagenet" if dataset in (None, "imagefolder") else dataset
    return PUBLISHED.get((dataset, recipe, student, None if recipe == "baseline" else teacher), [])
