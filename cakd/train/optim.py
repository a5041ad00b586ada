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


def build_optimizer(params, name, lr, momentum, weight_decay):
    name = name.lower()
    if name.startswith("sgd"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov="nesterov" in name)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eps=0.0316, alpha=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"invalid optimizer {name!r}: use sgd, sgd_nesterov, rmsprop or adamw")


def build_scheduler(optimizer, args, lr_min):
    """The main schedule with optional warmup chained before it; stepped once per epoch."""
    name = args.lr_scheduler.lower()
    if name == "steplr":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    elif name == "cosineannealinglr":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=args.epochs - args.lr_warmup_epochs, eta_min=lr_min
        )
    elif name == "exponentiallr":
        main = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_gamma)
    else:
        raise ValueError(f"invalid lr scheduler {args.lr_scheduler!r}: use steplr, cosineannealinglr or exponentiallr")
    if args.lr_warmup_epochs <= 0:
        return main
    method = args.lr_warmup_method.lower()
    if method == "linear":
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs
        )
    elif method == "constant":
        warmup = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs)
    else:
        raise ValueError(f"invalid warmup method {args.lr_warmup_method!r}: use linear or constant")
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[args.lr_warmup_epochs])


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """EMA of parameters and buffers: ``ema = decay * ema + (1 - decay) * param``."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(averaged, current, num_averaged):
            return decay * averaged + (1 - decay) * current

        super().__init__(model, device, ema_avg, use_buffers=True)
        for module in self.module.modules():  # the copy must not feed the student's taps
            module._forward_hooks.clear()


def ema_decay(args):
    """The reference's adjustment, so the EMA horizon does not depend on GPUs, batch or epochs."""
    adjust = args.world_size * args.batch_size * args.model_ema_steps / args.epochs
    alpha = min(1.0, (1.0 - args.model_ema_decay) * adjust)
    return 1.0 - alpha
