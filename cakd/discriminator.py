"""The discriminators and their GAN loss.

Released: a PatchGAN on one-channel attention maps. Paper (Eq. 8-9): a three-layer fully
connected network on features, telling the teacher's patch tokens ``h_T`` (real) from the
projected student tokens ``h'_S`` (fake).
"""
import torch
from torch import nn
from torch.func import functional_call


class PatchGAN(nn.Module):
    """pix2pix-style PatchGAN whose ``model.*`` keys match the released checkpoint layout.

    Five convolutions (the last three strides 2, 2, 2, 1, 1), BatchNorm on the middle
    three, LeakyReLU(0.2), then an average over the patch logits: one logit per map.
    """

    def __init__(self, in_channels: int = 1, width: int = 8):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]

        self.model = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2, True),
            *block(width, 2 * width, 2),
            *block(2 * width, 4 * width, 2),
            *block(4 * width, 8 * width, 1),
            nn.Conv2d(8 * width, 1, 4, 1, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.min_size = next(n for n in range(1, 1024) if self._output_size(n) >= 1)

    def _output_size(self, size):
        for layer in self.model:
            if isinstance(layer, nn.Conv2d):
                size = (size + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
        return size

    def forward(self, maps):
        # maps smaller than the network's minimum (24x24: a teacher grid under 5x5, as in
        # tiny smoke runs) are zero-padded on the bottom and right; 196x196 maps are untouched
        short = self.min_size - min(maps.shape[-2:])
        if short > 0:
            maps = nn.functional.pad(maps, (0, short, 0, short))
        return self.pool(self.model(maps)).flatten(1)


class TokenMLP(nn.Module):
    """The paper's discriminator: a per-token MLP ``D -> hidden -> hidden -> 1`` with
    LeakyReLU(0.2), its logits averaged over the tokens: one logit per sample, (B, 1).

    The paper says "three-layer fully connected"; widths and activation are our choice.
    """

    def __init__(self, in_dim: int = 768, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, tokens):
        return self.mlp(tokens).mean(dim=1)


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """``BCEWithLogits(logits, 1 if real else 0)``, computed in float32.

    With ``D = sigmoid(logits)``: ``gan_loss(x, True) = -mean(log D)`` and
    ``gan_loss(x, False) = -mean(log(1 - D))``.
    """
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


def call_with_snapshot(module: nn.Module, *args):
    """Call ``module`` on a detached copy of its parameters and buffers.

    The graph of the result then holds no reference to the live parameters, so the
    student's backward pass still works after the discriminator has stepped in place
    (the released code's latest commit fails there with an autograd in-place error),
    the gradient reaches the inputs only, and BatchNorm running stats are left as they were.
    """
    state = {name: tensor.detach().clone() for name, tensor in module.state_dict(keep_vars=True).items()}
    return functional_call(module, state, args)
