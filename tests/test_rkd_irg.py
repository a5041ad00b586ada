"""The rkd and irg recipes through the registry (``cakd.build_distiller``), on tiny models: a
step's loss is the cross-entropy plus ``cakd.rkd_loss`` / ``cakd.irg_loss`` recomputed here on
tensors read by hooks of this file's own, from the layers docs/FIDELITY.md names; it
back-propagates into the student and never into the teacher."""
import pytest
import torch
import torchvision
from torch.nn import functional as F
from torchvision.models import SwinTransformer, VisionTransformer

import cakd

SIZE, CLASSES = 64, 10


def tiny_vit():
    return VisionTransformer(image_size=SIZE, patch_size=16, num_layers=4, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=CLASSES)


def tiny_swin():
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1, 1, 2], num_heads=[1, 1, 1, 1],
                           window_size=[2, 2], num_classes=CLASSES)


TEACHERS = {"vit": tiny_vit, "swin": tiny_swin}


def with_random_heads(teacher):
    """A random torchvision ViT's head is zero: give every logit a value."""
    torch.nn.init.normal_(teacher.heads.head.weight if isinstance(teacher, VisionTransformer) else teacher.head.weight)
    return teacher.eval()


def captured(model, inputs=(), outputs=()):
    """Run-time outputs (and forward inputs) of named submodules, by hooks of this test."""
    modules, found, handles = dict(model.named_modules()), {}, []
    for name in outputs:
        handles.append(modules[name].register_forward_hook(lambda m, a, out, name=name: found.__setitem__(name, out)))
    for name in inputs:
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, name=name: found.__setitem__(name, a[0])))
    return found, handles


def step(recipe, kind, **overrides):
    torch.manual_seed(0)
    student, teacher = torchvision.models.resnet18(num_classes=CLASSES), with_random_heads(TEACHERS[kind]())
    distiller = cakd.build_distiller(recipe, student, teacher, image_size=SIZE, **overrides).train()
    images, targets = torch.randn(6, 3, SIZE, SIZE), torch.randint(0, CLASSES, (6,))
    images[3] = images[0]  # a repeated sample
    return distiller, student, teacher, images, targets


def teacher_embedding(teacher, found):
    """ViT: the class token after the final LayerNorm; Swin: the pooled token its head reads."""
    return found["encoder.ln"][:, 0] if isinstance(teacher, VisionTransformer) else found["head"]


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_rkd_step_is_cross_entropy_plus_rkd_loss_of_the_embeddings(kind):
    distiller, student, teacher, images, targets = step("rkd", kind, rkd_distance_weight=3.0, rkd_angle_weight=7.0)
    s_found, s_handles = captured(student, inputs=["fc"])
    t_found, t_handles = captured(teacher, inputs=["head"] if kind == "swin" else [], outputs=["encoder.ln"] if kind == "vit" else [])
    losses = distiller(images, targets)
    expected_rkd = cakd.rkd_loss(s_found["fc"], teacher_embedding(teacher, t_found), 3.0, 7.0)
    expected_cls = F.cross_entropy(s_found["fc"] @ student.fc.weight.T + student.fc.bias, targets)
    torch.testing.assert_close(losses["rkd"], expected_rkd)
    torch.testing.assert_close(losses["cls"], expected_cls)
    torch.testing.assert_close(losses["total"], expected_cls + expected_rkd)
    assert losses["rkd"] > 0
    losses["rkd"].backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    for handle in s_handles + t_handles:
        handle.remove()
    distiller.close()


def test_rkd_needs_no_class_count_of_the_teacher():
    """RKD compares relations of embeddings, never logits: a 1000-class teacher serves 10 classes."""
    teacher = VisionTransformer(image_size=SIZE, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    distiller = cakd.build_distiller("rkd", torchvision.models.resnet18(num_classes=CLASSES), teacher, image_size=SIZE)
    assert torch.isfinite(distiller(torch.randn(4, 3, SIZE, SIZE), torch.arange(4))["total"])


# the layers of docs/FIDELITY.md ("IRG's layers") for these tiny models: resnet18 at 64 px (final grid 2)
# has layer2 at 8x8 (4x) and layer3 at 4x4 (2x); the 4-block ViT's blocks at 1/2 and 3/4 of its depth are
# blocks 2 and 3 (indices 1 and 2) and it moves from index 2 to its last, 3; the Swin's stages 2 and 3
# are features.3 and .5, and its last stage's first block features.7.0 moves to the stage's output
IRG_LAYERS = {
    "vit": (["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2"],
            ["encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_3"]),
    "swin": (["features.3", "features.5"], ["features.7.0", "features.7"]),
}


def teacher_vector(kind, x):
    return x[:, 1:].mean(dim=1) if kind == "vit" else x.mean(dim=(1, 2))


@pytest.mark.parametrize("kind", sorted(TEACHERS))
def test_irg_step_is_cross_entropy_plus_irg_loss_of_the_named_layers(kind):
    distiller, student, teacher, images, targets = step("irg", kind, irg_vertex_weight=0.5, irg_edge_weight=2.0,
                                                        irg_transform_weight=3.0)
    edges, move = IRG_LAYERS[kind]
    s_found, s_handles = captured(student, inputs=["fc"], outputs=["layer2", "layer3", "layer4.0", "layer4"])
    t_found, t_handles = captured(teacher, inputs=["head"] if kind == "swin" else [],
                                  outputs=[*edges, *move] + (["encoder.ln"] if kind == "vit" else []))
    losses = distiller(images, targets)
    logits = s_found["fc"] @ student.fc.weight.T + student.fc.bias
    with torch.no_grad():
        teacher_logits = teacher(images)  # the same weights and input: the logits the step saw
    pool = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    expected_irg = cakd.irg_loss(
        logits, teacher_logits,
        [pool(s_found["layer2"]), pool(s_found["layer3"]), s_found["fc"]],
        [teacher_vector(kind, t_found[edges[0]]), teacher_vector(kind, t_found[edges[1]]), teacher_embedding(teacher, t_found)],
        [(pool(s_found["layer4.0"]), pool(s_found["layer4"]))],
        [tuple(teacher_vector(kind, t_found[name]) for name in move)],
        0.5, 2.0, 3.0,
    )
    torch.testing.assert_close(losses["irg"], expected_irg)
    torch.testing.assert_close(losses["total"], F.cross_entropy(logits, targets) + expected_irg)
    losses["total"].backward()
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    for handle in s_handles + t_handles:
        handle.remove()
    distiller.close()


def test_irg_layers_are_config_values():
    """Named layers replace auto (pairs by position; none drops the transformation); a mismatch is one clear error."""
    torch.manual_seed(0)
    student, teacher = torchvision.models.resnet18(num_classes=CLASSES), with_random_heads(tiny_vit())
    images, targets = torch.randn(4, 3, SIZE, SIZE), torch.arange(4)
    named = cakd.build_distiller("irg", student, teacher, image_size=SIZE, irg_student_layers="layer3",
                                 irg_teacher_layers="encoder.layers.encoder_layer_3", irg_student_transform="none",
                                 irg_teacher_transform="none", irg_vertex_weight=0.0, irg_edge_weight=1.0)
    s_found, handles = captured(student, outputs=["layer3"], inputs=["fc"])
    t_found, more = captured(teacher, outputs=["encoder.layers.encoder_layer_3", "encoder.ln"])
    got = named(images, targets)["irg"]
    expected = cakd.irg_loss(torch.zeros(4, 1), torch.zeros(4, 1), [s_found["layer3"].mean(dim=(2, 3)), s_found["fc"]],
                             [teacher_vector("vit", t_found["encoder.layers.encoder_layer_3"]), t_found["encoder.ln"][:, 0]],
                             edge_weight=1.0)
    torch.testing.assert_close(got, expected)
    for handle in handles + more:
        handle.remove()
    named.close()
    with pytest.raises(ValueError, match="pair by position"):
        cakd.build_distiller("irg", student, teacher, image_size=SIZE, irg_student_layers="layer2,layer3",
                             irg_teacher_layers="encoder.layers.encoder_layer_3")
    with pytest.raises(ValueError, match="both, or none"):
        cakd.build_distiller("irg", student, teacher, image_size=SIZE, irg_student_transform="none")
