"""The training loop on real (small) data: learning, accounting, divergence, stopping, reproducibility."""

from __future__ import annotations

import itertools

import pytest
import torch

from workers.results import EpochMetrics
from workers.training import TrialConfig, resolve_device, train

FAST = dict(dataset="synthetic", model="mlp", epochs=3, batch_size=64, seed=0)
ESGD_FAST = {"lr": 1.0, "langevin_steps": 5, "eta_prime": 0.5, "gamma_0": 0.03}


@pytest.mark.parametrize(
    ("optimizer", "knobs"),
    [("entropy_sgd", ESGD_FAST), ("sgd", {"lr": 0.1}), ("adam", {"lr": 3e-3})],
)
def test_each_optimizer_beats_chance_clearly(optimizer, knobs):
    result = train(TrialConfig(optimizer=optimizer, hyperparameters=knobs, **FAST))
    assert result.status == "completed", result.reason
    assert result.val_accuracy > 0.6 and result.test_accuracy > 0.6  # 4 classes: chance is 0.25
    assert len(result.history) == 3
    assert result.history[-1].val_loss < result.history[0].train_loss  # it learnt something
    assert result.state_dict and all(torch.isfinite(v).all() for v in result.state_dict.values())


def test_the_same_seed_reproduces_and_another_differs():
    config = TrialConfig(optimizer="entropy_sgd", hyperparameters={**ESGD_FAST, "epsilon": 1e-3}, **FAST)
    first, second = train(config), train(config)
    strip = [(m.train_loss, m.val_loss, m.val_accuracy, m.gradient_evaluations) for m in first.history]
    assert strip == [
        (m.train_loss, m.val_loss, m.val_accuracy, m.gradient_evaluations) for m in second.history
    ]
    assert first.test_accuracy == second.test_accuracy
    for key, value in first.state_dict.items():
        assert torch.equal(value, second.state_dict[key])
    other = train(TrialConfig(**{**config.__dict__, "seed": 1}))
    assert other.history[0].train_loss != first.history[0].train_loss


def test_entropy_sgd_and_sgd_spend_the_same_gradient_evaluations():
    # 900 training samples / batch 64 = 14 evaluations per epoch, 42 in all: not a multiple of L = 5,
    # so Entropy-SGD's last step is shortened to the two evaluations left.
    esgd = train(TrialConfig(optimizer="entropy_sgd", hyperparameters=ESGD_FAST, **FAST))
    sgd = train(TrialConfig(optimizer="sgd", hyperparameters={"lr": 0.1}, **FAST))
    assert esgd.gradient_evaluations == sgd.gradient_evaluations == 42
    assert [m.gradient_evaluations for m in sgd.history] == [14, 28, 42]
    assert [m.gradient_evaluations for m in esgd.history] == [
        15,
        30,
        42,
    ]  # epochs end at the step that completes them


def test_a_diverging_run_ends_with_a_reason_not_an_exception():
    result = train(TrialConfig(optimizer="sgd", hyperparameters={"lr": 1e12, "momentum": 0.99}, **FAST))
    assert result.status == "diverged"
    assert "non-finite" in result.reason and "epoch" in result.reason
    assert result.test_accuracy is None
    assert (
        result.metrics()["history"][-1]["train_loss"] is None
        or result.metrics()["history"][-1]["val_loss"] is None
    )


def test_the_callback_can_stop_training_and_no_further_epoch_runs():
    seen: list[EpochMetrics] = []

    def report(metrics: EpochMetrics) -> bool:
        seen.append(metrics)
        return metrics.epoch == 2

    result = train(TrialConfig(optimizer="sgd", hyperparameters={"lr": 0.1}, **{**FAST, "epochs": 6}), report)
    assert result.status == "stopped"
    assert [m.epoch for m in seen] == [1, 2]
    assert len(result.history) == 2
    assert result.gradient_evaluations == 28
    assert result.test_accuracy is not None


def test_batchnorm_and_dropout_models_train_with_entropy_sgd():
    config = TrialConfig(
        optimizer="entropy_sgd", hyperparameters=ESGD_FAST, batchnorm=True, dropout=0.1, **FAST
    )
    result = train(config)
    assert result.status == "completed"
    assert result.val_accuracy > 0.6
    assert any("running_mean" in key for key in result.state_dict)


def test_metrics_are_reported_per_epoch_with_wall_time():
    seen: list[EpochMetrics] = []
    train(TrialConfig(optimizer="adam", **FAST), seen.append)
    assert [m.epoch for m in seen] == [1, 2, 3]
    assert all(0 < a.wall_time <= b.wall_time for a, b in itertools.pairwise(seen))
    assert all(0.0 <= m.val_accuracy <= 1.0 for m in seen)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; valid choices: entropy_sgd, sgd, adam"),
        ({"hyperparameters": {"gamma": 1.0}}, "unknown knob 'gamma'"),
        (
            {"hyperparameters": {"langevin_steps": 2.5}},
            "knob 'langevin_steps' of optimizer 'entropy_sgd' must be int",
        ),
        ({"epochs": 0}, "Invalid epochs value: 0"),
        ({"batch_size": True}, "Invalid batch_size value: True"),
        ({"dropout": 1.0}, "Invalid dropout value: 1.0"),
    ],
)
def test_bad_configs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrialConfig(**overrides)


def test_invalid_optimizer_values_are_refused_before_training():
    with pytest.raises(ValueError, match="Invalid alpha value"):
        train(TrialConfig(optimizer="entropy_sgd", hyperparameters={"alpha": 2.0}, **FAST))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device exists")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_trial_trains_on_cuda():
    result = train(TrialConfig(optimizer="entropy_sgd", hyperparameters=ESGD_FAST, device="cuda", **FAST))
    assert result.status == "completed" and result.val_accuracy > 0.6
    assert all(
        value.device.type == "cpu" for value in result.state_dict.values()
    )  # weights handed back on CPU


def test_a_budget_in_gradient_evaluations_ends_with_a_partial_epoch():
    config = TrialConfig(optimizer="entropy_sgd", hyperparameters=ESGD_FAST, **{**FAST, "epochs": 1})
    result = train(TrialConfig(**{**config.__dict__, "gradient_evaluations": 20}))
    assert result.gradient_evaluations == 20
    assert [m.gradient_evaluations for m in result.history] == [15, 20]  # 14 per epoch; L = 5


def test_iterate_trial_streams_epochs_then_the_result():
    from workers.results import TrialResult
    from workers.training import iterate_trial

    items = list(iterate_trial(TrialConfig(optimizer="sgd", **FAST)))
    assert [type(i).__name__ for i in items] == ["EpochMetrics"] * 3 + ["TrialResult"]
    assert isinstance(items[-1], TrialResult) and items[-1].history == items[:3]
