"""Models by name, each in three widths, with optional BatchNorm and dropout.

=====  ===============  ======================================================================================
name   input shape      layers at width "small" (medium / large are wider, same depth)
=====  ===============  ======================================================================================
mlp    any              flatten → 100 → 100 → classes (the MLP baseline of the MNIST-1D paper)
cnn1d  (d,)             conv(1→25, k5, s2, p1) → conv(25→25, k3, s2, p1) → conv(25→25, k3, s2, p1) → linear
                        (the MNIST-1D authors' ``ConvBase``; 25 × 5 = 125 features for d = 40)
lenet  (C, H, W)        [conv 5×5 (pad 2) → max-pool 2] × 2 with 6, 16 channels → 120 → 84 → classes
=====  ===============  ======================================================================================

Every hidden layer is followed by ReLU. ``batchnorm=True`` puts BatchNorm after every convolution and hidden
linear layer (never after the output layer) and drops the biases it makes redundant. ``dropout > 0`` puts
Dropout before every linear layer that follows another representation: after each hidden linear layer of the
MLP and LeNet, and after cnn1d's flattened convolution features. Initialisation is PyTorch's default, so
``torch.manual_seed`` fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

MODELS: tuple[str, ...] = ("mlp", "cnn1d", "lenet")
WIDTHS: tuple[str, ...] = ("small", "medium", "large")

_MLP_HIDDEN = {"small": (100, 100), "medium": (256, 256), "large": (512, 512)}
_CNN1D_CHANNELS = {"small": 25, "medium": 50, "large": 100}
_LENET_CHANNELS = {"small": (6, 16), "medium": (16, 32), "large": (32, 64)}
_LENET_HIDDEN = {"small": (120, 84), "medium": (256, 128), "large": (512, 256)}

# The rank of a sample each model accepts (None: any), and how to say so in an error.
_INPUT_RANK = {"mlp": None, "cnn1d": 1, "lenet": 3}
_EXPECTED = {
    "mlp": "any input shape",
    "cnn1d": "1-D inputs of shape (d,), e.g. (40,) for mnist1d",
    "lenet": "images of shape (C, H, W), e.g. (1, 28, 28) for mnist5k",
}


def supports(name: str, input_shape: Sequence[int]) -> bool:
    """Whether model ``name`` accepts samples of ``input_shape`` (raises ValueError for an unknown name)."""
    _check_name(name)
    rank = _INPUT_RANK[name]
    return rank is None or len(input_shape) == rank


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: str = "small",
    batchnorm: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """Model ``name`` (one of :data:`MODELS`): (batch, *input_shape) inputs to (batch, num_classes) logits."""
    shape = tuple(int(size) for size in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"Invalid input_shape value: {tuple(input_shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Invalid num_classes value: {num_classes} (must be an integer >= 2)")
    if width not in WIDTHS:
        raise ValueError(f"Invalid width value: {width!r}; valid widths are: {', '.join(WIDTHS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout value: {dropout} (must be in [0, 1))")
    if not supports(name, shape):
        raise ValueError(f"Model {name!r} expects {_EXPECTED[name]}; got input shape {shape}")
    builders: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn1d": _cnn1d, "lenet": _lenet}
    return builders[name](shape, num_classes, width, batchnorm, dropout)


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid names are: {', '.join(MODELS)}")


def _mlp(shape: tuple[int, ...], num_classes: int, width: str, batchnorm: bool, dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), *_head(math.prod(shape), _MLP_HIDDEN[width], num_classes, batchnorm, dropout)
    )


def _cnn1d(
    shape: tuple[int, ...], num_classes: int, width: str, batchnorm: bool, dropout: float
) -> nn.Module:
    channels = _CNN1D_CHANNELS[width]
    layers: list[nn.Module] = [nn.Unflatten(1, (1, shape[0]))]  # (batch, d) -> (batch, 1 channel, d)
    for c_in, kernel in ((1, 5), (channels, 3), (channels, 3)):
        conv = nn.Conv1d(c_in, channels, kernel, stride=2, padding=1, bias=not batchnorm)
        layers += [conv, *_norm(nn.BatchNorm1d, channels, batchnorm), nn.ReLU()]
    features = nn.Sequential(*layers, nn.Flatten())
    n_features = _output_size(features, shape, "cnn1d")
    return nn.Sequential(*features, *_dropout(dropout), nn.Linear(n_features, num_classes))


def _lenet(
    shape: tuple[int, ...], num_classes: int, width: str, batchnorm: bool, dropout: float
) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = shape[0]
    for c_out in _LENET_CHANNELS[width]:
        # Padding keeps the size through each 5×5 convolution and ceil_mode lets pooling take odd sizes, so
        # images as small as 8×8 (digits) stay valid.
        conv = nn.Conv2d(c_in, c_out, 5, padding=2, bias=not batchnorm)
        layers += [conv, *_norm(nn.BatchNorm2d, c_out, batchnorm), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c_out
    features = nn.Sequential(*layers, nn.Flatten())
    n_features = _output_size(features, shape, "lenet")
    head = _head(n_features, _LENET_HIDDEN[width], num_classes, batchnorm, dropout)
    return nn.Sequential(*features, *head)


def _head(
    n_in: int, hidden: Sequence[int], num_classes: int, batchnorm: bool, dropout: float
) -> list[nn.Module]:
    """Hidden linear layers (each: linear → [BatchNorm] → ReLU → [Dropout]), then the output layer."""
    layers: list[nn.Module] = []
    for n_out in hidden:
        linear = nn.Linear(n_in, n_out, bias=not batchnorm)
        layers += [linear, *_norm(nn.BatchNorm1d, n_out, batchnorm), nn.ReLU(), *_dropout(dropout)]
        n_in = n_out
    return [*layers, nn.Linear(n_in, num_classes)]


def _norm(kind: type[nn.Module], features: int, enabled: bool) -> list[nn.Module]:
    return [kind(features)] if enabled else []


def _dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


def _output_size(features: nn.Module, shape: tuple[int, ...], name: str) -> int:
    """Features per sample after ``features``, from a forward pass on one zero sample."""
    # Eval mode and no_grad: the dry run must not update BatchNorm's running statistics.
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *shape))
    except RuntimeError as exc:
        raise ValueError(f"Model {name!r} cannot take inputs of shape {shape}: too small ({exc})") from exc
    finally:
        features.train()
    return out.shape[1]
