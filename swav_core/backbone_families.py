"""timm and torchvision backbones by name, made headless, and what crops they can take.

`timm/<name>`: `timm.create_model(name, pretrained=False, num_classes=0)`, which returns
pooled features. Vision transformers (and the other timm models that accept it) are
built with `dynamic_img_size=True` at the largest crop's size: one set of position
embeddings for that grid, resampled (bicubic) to each crop's grid in the forward pass.
That is what multi-crop needs (the paper's 2x224 + 6x96 crops share every weight), and
it is timm's own mechanism, so a timm export loads back into timm unchanged.

`torchvision/<name>`: `torchvision.models.get_model(name, weights=None)` with its last
classifier Linear replaced by `nn.Identity()`, so the state dict loads with `strict=True`
into the same torchvision model whose classifier is replaced the same way.

The feature width is read from a forward pass (`feature_width`), not from a table: timm's
`num_features` is not always the pooled output's width (MobileNetV3's head conv widens it).
"""

from __future__ import annotations

import torch
from torch import nn

from swav_core.errors import ConfigError


def timm_backbone(name: str, input_size: int) -> nn.Module:
    """timm's `name`, random weights, no classifier; dynamic image size where it applies."""
    import timm

    try:
        return timm.create_model(
            name, pretrained=False, num_classes=0, img_size=input_size, dynamic_img_size=True
        )
    except TypeError:  # the model has a fixed-size-free design (CNNs): no such arguments
        return timm.create_model(name, pretrained=False, num_classes=0)


def _parent_and_attribute(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = qualified.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attribute


def torchvision_backbone(name: str, input_size: int) -> nn.Module:
    """torchvision's `name`, random weights, its last classifier Linear made an Identity."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"backbone torchvision/{name} has no Linear classifier to remove (it classifies "
            "with a convolution); choose another torchvision model or its timm version"
        )
    parent, attribute = _parent_and_attribute(model, linears[-1])
    setattr(parent, attribute, nn.Identity())
    return model


@torch.no_grad()
def pooled_output(backbone: nn.Module, size: int) -> torch.Tensor:
    """The backbone's output for one `size` px image, in eval mode (on its own device,
    so a model built on the meta device costs nothing)."""
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        return backbone(torch.zeros(1, 3, size, size, device=device))
    finally:
        backbone.train(was_training)


def feature_width(backbone: nn.Module, name: str, size: int) -> int:
    """The width F of the pooled features (B x F) that `backbone` gives for `size` px input."""
    output = crop_output(backbone, name, size)
    return int(output.shape[1])


def crop_output(backbone: nn.Module, name: str, size: int) -> torch.Tensor:
    """`pooled_output`, or a ConfigError naming the backbone, the size and the reason when
    the backbone cannot take `size` px crops or does not give B x F features."""
    try:
        output = pooled_output(backbone, size)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"backbone {name} cannot take {size} px crops ({reason}); use larger crops in "
            "size_crops (CNNs that downsample 32x need at least 32 px) or another backbone"
        ) from exc
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(
            f"backbone {name} gives {shape} for one image, not pooled features (1 x F); "
            "choose a classification backbone"
        )
    return output


def check_crop_sizes(backbone: nn.Module, name: str, sizes: tuple[int, ...]) -> None:
    """Raise ConfigError before training when `backbone` cannot take one of the crop sizes
    (a fixed-size ViT, or a CNN whose downsampling leaves nothing of a small crop)."""
    for size in sizes:
        crop_output(backbone, name, size)


def has_batch_norm(backbone: nn.Module) -> bool:
    """Whether any layer normalises over the batch: ResNets and EfficientNets do; ViTs and
    ConvNeXts normalise each sample (LayerNorm) and are trained with AdamW by their authors."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
