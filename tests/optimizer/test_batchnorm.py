"""BatchNorm running statistics re-estimated at the current weights, with dropout off."""

from __future__ import annotations

import torch
from torch import nn

from optimizer import EntropySGD, reestimate_batchnorm


def test_statistics_are_those_of_the_data_with_dropout_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[1].momentum = 0.3
    model.train()
    data = torch.randn(256, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.0])
    model[1].running_mean.fill_(100.0)  # stale statistics to be replaced

    reestimate_batchnorm(model, data.split(64))

    bn = model[1]
    # Equal weight per batch: the mean of the four batch means, and of the four unbiased batch variances.
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in data.split(64)]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in data.split(64)]).mean(0))
    assert model.training and bn.training and model[0].training  # modes restored
    assert bn.momentum == 0.3  # momentum restored


def test_model_without_batchnorm_is_left_alone():
    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reestimate_batchnorm(model, [torch.randn(4, 3)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inner_passes_disturb_the_statistics_and_reestimation_restores_them():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(128, 4), torch.randint(0, 2, (128,))
    opt = EntropySGD(model.parameters(), lr=1.0, langevin_steps=5, eta_prime=0.5, epsilon=0.1, seed=0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        expected = model[0](x).mean(0)  # the BatchNorm input mean at the weights x, not x′
    assert not torch.allclose(model[1].running_mean, expected, atol=1e-3)
    reestimate_batchnorm(model, [x])
    torch.testing.assert_close(model[1].running_mean, expected)
