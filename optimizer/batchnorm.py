"""Re-estimation of BatchNorm running statistics at the current weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs: Iterable[Tensor]) -> None:
    """Recompute every BatchNorm layer's running mean and variance from ``inputs`` at the current weights.

    Entropy-SGD's inner forward passes run at the Langevin iterate x′, so the running statistics describe
    x′, not the weights x being evaluated. This resets them and averages the batch statistics of a pass
    over ``inputs`` (batches of model inputs, e.g. training data) with equal weight per batch. Only the
    BatchNorm layers are put in training mode, so dropout stays off, unlike
    ``torch.optim.swa_utils.update_bn``. The model's modes and the layers' momenta are restored afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches seen
        layer.train()
    try:
        for batch in inputs:
            model(batch)
    finally:
        for module, training in modes.items():
            module.train(training)
        for layer, momentum in momenta.items():
            layer.momentum = momentum
