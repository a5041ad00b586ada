"""torch and torchvision stay exactly as installed; hooks come off when the distiller goes."""
import gc

import torch
import torchvision

import cakd
from cakd.teachers.vit import ViTTaps
from conftest import tiny_vit


def snapshot(*namespaces):
    """Every attribute each namespace defines itself, by identity."""
    return {(ns.__name__, name): value for ns in namespaces for name, value in list(vars(ns).items())}


def namespaces():
    return (
        torch.nn.functional,
        torch.nn.MultiheadAttention,
        torch.nn.modules.activation,
        torch.Tensor,
        torchvision.models,
        torchvision.models.resnet,
        torchvision.models.resnet.ResNet,
        torchvision.models.resnet.Bottleneck,
        torchvision.models.vision_transformer,
        torchvision.models.vision_transformer.VisionTransformer,
        torchvision.models.vision_transformer.EncoderBlock,
    )


def hook_count(*models):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def test_libraries_untouched_by_a_step():
    before = snapshot(*namespaces())
    student = cakd.build_student("resnet18", num_classes=10)
    teacher = tiny_vit(image_size=96)
    distiller = cakd.build_distiller("cakd", student, teacher)
    losses = distiller(torch.randn(2, 3, 96, 96), torch.tensor([0, 1]), epoch=40)
    losses["disc"].backward(retain_graph=True)
    losses["total"].backward()
    after = snapshot(*namespaces())
    changed = [key for key in before if after.get(key) is not before[key]]
    assert changed == [] and set(after) == set(before)


def test_hooks_removed_on_close_and_on_delete(small_pair):
    student, teacher = small_pair
    assert hook_count(student, teacher) == 0
    distiller = cakd.build_distiller("cakd", student, teacher)
    assert hook_count(student, teacher) == 4  # layer3, avgpool, last ln_1, encoder.ln
    distiller.close()
    assert hook_count(student, teacher) == 0

    for recipe in ("baseline", "logits", "cakd"):
        distiller = cakd.build_distiller(recipe, student, teacher)
        distiller(torch.randn(1, 3, 64, 64), torch.tensor([0]), epoch=30)
        del distiller
        gc.collect()
        assert hook_count(student, teacher) == 0, recipe


def test_teacher_stays_in_eval_and_outside_parameters(small_pair):
    student, teacher = small_pair
    distiller = cakd.build_distiller("cakd", student, teacher)
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert not any(key.startswith("teacher") for key in distiller.state_dict())
    distiller.to(torch.float64)  # .to() still moves the teacher
    assert next(teacher.parameters()).dtype == torch.float64


def test_teacher_maps_do_not_depend_on_the_fused_attention_path():
    """The maps are recomputed from ln_1's output, so MHA's fast path (taken in eval +
    no_grad) and its slow path give the same targets."""
    teacher = tiny_vit(image_size=96)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 96, 96)
    taps = ViTTaps(teacher)
    with torch.no_grad():
        fused = taps(images)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            slow = taps(images)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    for key in fused:
        torch.testing.assert_close(fused[key], slow[key], rtol=1e-5, atol=1e-5)
    # and the pre-softmax map really is the attention the block uses
    block = teacher.encoder.layers[-1]
    x = block.ln_1(torch.randn(2, 37, 32))
    _, weights = block.self_attention(x, x, x, need_weights=True, average_attn_weights=False)
    from cakd.teachers.vit import vit_score_maps

    full_qk, _ = vit_score_maps(torch.cat([x[:, :1], x], 1), block.self_attention)  # drop a dummy token
    q, k, _ = torch.nn.functional.linear(x, block.self_attention.in_proj_weight, block.self_attention.in_proj_bias).chunk(3, -1)
    q, k = q.view(2, 37, 2, 16).transpose(1, 2), k.view(2, 37, 2, 16).transpose(1, 2)
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1), weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full_qk, (q @ k.transpose(-1, -2) / 4.0).mean(1), rtol=1e-5, atol=1e-5)
    taps.remove()
