"""ResNet152x2, the CNN teacher of Table 4's first Logits column: every width of ResNet-152
doubled, its logits distilled by the logits / kd recipes, refused in words by a recipe that
needs attention maps."""
import pytest
import torch
import torchvision
from torch.nn import functional as F

import cakd
from cakd.students import resnet_x2
from cakd.teachers.cnn import WideResNetTeacher, resnet152x2
from cakd.teachers.registry import family_of, teacher_taps


def test_resnet152x2_is_resnet152_with_every_width_doubled():
    """Each weight of torchvision's ResNet-152 has a twin of twice its channels (the image's 3
    input channels and the class count aside), on the meta device."""
    with torch.device("meta"):
        single, double = torchvision.models.resnet152(), resnet152x2()
    shapes = {name: p.shape for name, p in double.state_dict().items()}
    assert shapes.keys() == single.state_dict().keys()
    for name, p in single.state_dict().items():
        if p.dim() == 0:  # num_batches_tracked
            continue
        want = list(p.shape)
        if name != "fc.weight" and name != "fc.bias":
            want[0] *= 2
        if p.dim() > 1 and name != "conv1.weight":
            want[1] *= 2
        assert list(shapes[name]) == want, name
    assert isinstance(double, WideResNetTeacher) and family_of(double) is not None and family_of(single) is None


@pytest.fixture
def wide_teacher():
    torch.manual_seed(3)
    return resnet_x2([1, 1, 1, 1], num_classes=10, cls=WideResNetTeacher).eval()


def test_kd_from_a_cnn_teacher_is_hintons_loss_on_its_logits(wide_teacher, batch):
    """The kd recipe's term against Hinton et al.'s formula, recomputed here from the teacher's
    own forward: alpha * T^2 * KL(softmax(z_T / T) || softmax(z_S / T)), T = 1, alpha = 0.5."""
    images, targets = batch
    torch.manual_seed(0)
    student = cakd.build_student("resnet18", num_classes=10)
    distiller = cakd.build_distiller("kd", student, wide_teacher, image_size=64)
    distiller.train()
    losses = distiller(images, targets)
    with torch.no_grad():
        z_t = wide_teacher(images)
    z_s = distiller.last_logits
    p_t = F.softmax(z_t, 1)
    kl = (p_t * (F.log_softmax(z_t, 1) - F.log_softmax(z_s, 1))).sum(1).mean()
    torch.testing.assert_close(losses["kd"], 0.5 * kl)
    torch.testing.assert_close(losses["total"], 0.5 * F.cross_entropy(z_s, targets) + 0.5 * kl)
    losses["total"].backward()
    assert all(p.grad is None for p in wide_teacher.parameters())  # the teacher is not trained
    assert student.fc.weight.grad is not None


def test_the_pooled_feature_and_the_last_map_are_the_cnn_teachers_tokens(wide_teacher, batch):
    images, _ = batch
    taps = teacher_taps(wide_teacher, 64, attention=False, tokens=True)
    out = taps(images)
    with torch.no_grad():
        body = torch.nn.Sequential(*list(wide_teacher.children())[:-2])(images)
    assert taps.grid == 2 and out["patch_tokens"].shape == (2, 4, 4096)
    torch.testing.assert_close(out["patch_tokens"], body.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out["cls_token"], body.mean((2, 3)))
    torch.testing.assert_close(out["logits"], wide_teacher(images))


def test_a_recipe_that_needs_attention_refuses_a_cnn_teacher_in_words(wide_teacher):
    student = cakd.build_student("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"a CNN teacher \(WideResNetTeacher\) has no attention maps or q, k, v for this "
                                         r"recipe: use it with the logits, kd or rkd recipe"):
        cakd.build_distiller("cakd", student, wide_teacher, image_size=64)
