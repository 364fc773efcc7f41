import itertools
import re

import pytest
import torch
from torch import nn

from workers.datasets import DATASETS, load_dataset
from workers.networks import MODELS, WIDTHS, build_model, supports

# Which built-in datasets each model claims; the pair tests check the claims both ways.
SUPPORTED = {
    "mlp": set(DATASETS),
    "cnn1d": {"mnist1d", "synthetic"},
    "lenet": {"digits", "mnist5k"},
}
VARIANTS = [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)]  # (batchnorm, dropout)


def _batch(dataset: str, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, int]:
    splits = load_dataset(dataset)
    return splits.train.x[:size], splits.train.y[:size], splits.num_classes


@pytest.mark.parametrize(("model", "dataset"), list(itertools.product(MODELS, DATASETS)))
def test_support_matches_the_documented_pairs(model: str, dataset: str) -> None:
    assert supports(model, load_dataset(dataset).input_shape) == (dataset in SUPPORTED[model])


@pytest.mark.parametrize(
    ("model", "dataset"), [(m, d) for m in MODELS for d in DATASETS if d in SUPPORTED[m]]
)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(("batchnorm", "dropout"), VARIANTS)
def test_forward_and_backward_on_supported_datasets(
    model: str, dataset: str, width: str, batchnorm: bool, dropout: float
) -> None:
    x, y, num_classes = _batch(dataset)
    shape = tuple(x.shape[1:])
    net = build_model(model, shape, num_classes, width=width, batchnorm=batchnorm, dropout=dropout)
    logits = net(x)
    assert logits.shape == (len(x), num_classes)
    nn.functional.cross_entropy(logits, y).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0


@pytest.mark.parametrize(
    ("model", "dataset"), [(m, d) for m in MODELS for d in DATASETS if d not in SUPPORTED[m]]
)
def test_unsupported_pairs_are_refused(model: str, dataset: str) -> None:
    splits = load_dataset(dataset)
    expected = rf"Model '{model}' expects .*; got input shape {re.escape(str(splits.input_shape))}"
    with pytest.raises(ValueError, match=expected):
        build_model(model, splits.input_shape, splits.num_classes)


def test_cnn1d_is_the_mnist1d_authors_model() -> None:
    net = build_model("cnn1d", (40,), 10)
    convs = [m for m in net if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 25, (5,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
    ]
    (linear,) = [m for m in net if isinstance(m, nn.Linear)]
    assert (linear.in_features, linear.out_features) == (125, 10)
    assert sum(p.numel() for p in net.parameters()) == 5210


def test_mlp_small_is_the_mnist1d_baseline() -> None:
    net = build_model("mlp", (40,), 10)
    sizes = [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]
    assert sizes == [(40, 100), (100, 100), (100, 10)]


@pytest.mark.parametrize(("model", "shape"), [("mlp", (40,)), ("cnn1d", (40,)), ("lenet", (1, 28, 28))])
def test_width_grows_the_model(model: str, shape: tuple[int, ...]) -> None:
    sizes = [sum(p.numel() for p in build_model(model, shape, 10, width=w).parameters()) for w in WIDTHS]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


@pytest.mark.parametrize(("model", "shape"), [("mlp", (40,)), ("cnn1d", (40,)), ("lenet", (1, 8, 8))])
def test_batchnorm_placement_and_untouched_statistics(model: str, shape: tuple[int, ...]) -> None:
    net = build_model(model, shape, 10, batchnorm=True)
    layers = list(net)
    norms = [i for i, m in enumerate(layers) if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    weighted = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    assert [i - 1 for i in norms] == weighted[:-1]  # one after every layer but the output layer
    assert isinstance(layers[-1], nn.Linear)
    for i in norms:  # the construction-time dry run must not have updated the running statistics
        assert int(layers[i].num_batches_tracked) == 0
        assert torch.equal(layers[i].running_mean, torch.zeros_like(layers[i].running_mean))
    assert net.training and all(m.training for m in net.modules())
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in build_model(model, shape, 10))


@pytest.mark.parametrize(("model", "shape"), [("mlp", (40,)), ("cnn1d", (40,)), ("lenet", (1, 8, 8))])
def test_dropout_sits_before_linear_layers(model: str, shape: tuple[int, ...]) -> None:
    layers = list(build_model(model, shape, 10, dropout=0.25))
    drops = [i for i, m in enumerate(layers) if isinstance(m, nn.Dropout)]
    assert drops and all(layers[i].p == 0.25 and isinstance(layers[i + 1], nn.Linear) for i in drops)
    assert not any(isinstance(m, nn.Dropout) for m in build_model(model, shape, 10))


@pytest.mark.parametrize(("model", "shape"), [("mlp", (40,)), ("cnn1d", (40,)), ("lenet", (1, 8, 8))])
def test_initialisation_follows_the_torch_seed(model: str, shape: tuple[int, ...]) -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(build_model(model, shape, 10, batchnorm=True).state_dict().values())

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet"}, "Unknown model 'resnet'; valid names are: mlp, cnn1d, lenet"),
        ({"width": "huge"}, "Invalid width value: 'huge'; valid widths are: small, medium, large"),
        ({"dropout": 1.0}, "Invalid dropout value"),
        ({"dropout": -0.1}, "Invalid dropout value"),
        ({"num_classes": 1}, "Invalid num_classes value"),
        ({"input_shape": ()}, "Invalid input_shape value"),
        ({"input_shape": (0,)}, "Invalid input_shape value"),
        ({"name": "cnn1d", "input_shape": (2,)}, "Model 'cnn1d' cannot take inputs of shape (2,): too small"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    arguments = {"name": "mlp", "input_shape": (40,), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError) as caught:
        build_model(**arguments)
    assert message in str(caught.value)


def test_lenet_takes_small_and_odd_images() -> None:
    for shape in [(1, 8, 8), (3, 5, 7), (1, 28, 28), (1, 1, 1)]:
        assert build_model("lenet", shape, 3)(torch.zeros(2, *shape)).shape == (2, 3)
