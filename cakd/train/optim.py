"""Optimizers, learning-rate schedules and the EMA, as the torchvision reference recipe
(and the released code, a fork of it) builds them."""
import torch
from torch import nn

NORM_CLASSES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def parameter_groups(model, weight_decay, norm_weight_decay=None, bias_weight_decay=None, embedding_decay=None):
    """Split parameters by the reference's rules: norm layers, biases and transformer
    embeddings may each get their own weight decay."""
    custom = []
    if bias_weight_decay is not None:
        custom.append(("bias", bias_weight_decay))
    if embedding_decay is not None:
        custom += [(key, embedding_decay) for key in ("class_token", "position_embedding", "relative_position_bias_table")]
    groups = {"other": [], "norm": []}
    decays = {"other": weight_decay, "norm": norm_weight_decay if norm_weight_decay is not None else weight_decay}
    for key, decay in custom:
        groups[key], decays[key] = [], decay

    def visit(module):
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            target = next((key for key, _ in custom if key == name), None)
            if target is None:
                target = "norm" if norm_weight_decay is not None and isinstance(module, NORM_CLASSES) else "other"
            groups[target].append(p)
        for child in module.children():
            visit(child)

    visit(model)
    return [{"params": groups[key], "weight_decay": decays[key]} for key in groups if groups[key]]


def scale_lr(groups, factors, lr):
    """Parameter groups with the parameters of ``factors`` (``{parameter: factor}``) moved to
    groups of their own at ``factor * lr`` (same weight decay); the others as they were. The
    schedulers then scale each group's lr alike."""
    if not factors:
        return groups
    out = []
    for group in groups:
        by_factor = {}
        for p in group["params"]:
            by_factor.setdefault(factors.get(p, 1.0), []).append(p)
        for factor, params in by_factor.items():
            out.append({**group, "params": params, **({} if factor == 1.0 else {"lr": factor * lr})})
    return out


def build_optimizer(params, name, lr, momentum, weight_decay):
    name = name.lower()
    if name.startswith("sgd"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov="nesterov" in name)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=0.0316, alpha=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"invalid optimizer {name!r}: use sgd, sgd_nesterov, rmsprop or adamw")


SCHEDULERS = ("steplr", "multisteplr", "cosineannealinglr", "exponentiallr")


def build_scheduler(
    optimizer,
    name="steplr",
    epochs=90,
    step_size=30,
    milestones=(),
    gamma=0.1,
    lr_min=0.0,
    warmup_epochs=0,
    warmup_method="constant",
    warmup_decay=0.01,
):
    """The main schedule with optional warmup chained before it; stepped once per epoch.

    ``steplr`` multiplies the lr by ``gamma`` every ``step_size`` epochs, ``multisteplr`` at
    each epoch of ``milestones``; both count epochs from the end of the warmup, as
    torchvision's reference chains them.
    """
    name = name.lower()
    if name == "steplr":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    elif name == "multisteplr":
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    elif name == "cosineannealinglr":
        if epochs <= warmup_epochs:
            raise ValueError(f"the cosine schedule needs more epochs ({epochs}) than warmup epochs ({warmup_epochs})")
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup_epochs, eta_min=lr_min)
    elif name == "exponentiallr":
        main = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    else:
        raise ValueError(f"invalid lr scheduler {name!r}: use {', '.join(SCHEDULERS)}")
    if warmup_epochs <= 0:
        return main
    method = warmup_method.lower()
    if method == "linear":
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_decay, total_iters=warmup_epochs)
    elif method == "constant":
        warmup = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=warmup_decay, total_iters=warmup_epochs)
    else:
        raise ValueError(f"invalid warmup method {warmup_method!r}: use linear or constant")
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """EMA of parameters and buffers, ``ema = decay * ema + (1 - decay) * param`` (torch's
    ``get_ema_multi_avg_fn``: one foreach lerp per device and dtype)."""

    def __init__(self, model, decay, device="cpu"):
        multi_avg_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
        super().__init__(model, device, multi_avg_fn=multi_avg_fn, use_buffers=True)
        for module in self.module.modules():  # the copy must not feed the student's taps
            module._forward_hooks.clear()


def ema_decay(decay, steps, batch_size, world_size, epochs):
    """The reference's adjustment of ``decay`` (applied every ``steps`` iterations), so the
    EMA horizon does not depend on GPUs, batch or epochs."""
    adjust = world_size * batch_size * steps / epochs
    alpha = min(1.0, (1.0 - decay) * adjust)
    return 1.0 - alpha
