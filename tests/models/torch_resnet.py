"""torchvision's ResNet-50 as the reference backbone of the ResNet tests."""

import torch
import torchvision


def resnet50_with_random_bn(seed=0, bn_seed=1):
    """A randomly initialised torchvision ResNet-50 whose BN statistics and affine parameters
    are moved away from their defaults (so that eval-mode BN is not the identity, and a backbone
    left at its own initialisation cannot pass for a loaded one). Returns (model, generator):
    the generator continues the BN stream, for inputs drawn after it."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    g = torch.Generator().manual_seed(bn_seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model, g
