"""EntropySGD against hand-computed values, torch.optim.SGD and a literal reading of Algorithm 1."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn

from optimizer import EntropySGD

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def quadratic_closure(optimizer: EntropySGD, param: torch.Tensor, curvature: float = 1.0):
    """f(x) = curvature/2 · |x|², so ∇f(x) = curvature · x."""

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * curvature * (param**2).sum()
        loss.backward()
        return loss

    return closure


def plain(**overrides):
    """Settings that make hand computation easy: no momentum, no noise, fixed γ = 0.5."""
    settings = dict(
        lr=1.0,
        gamma_0=0.5,
        gamma_1=0.0,
        eta_prime=0.1,
        epsilon=0.0,
        alpha=0.75,
        momentum=0.0,
        inner_momentum=None,
        nesterov=False,
    )
    settings.update(overrides)
    return settings


# ----------------------------------------------------------------------------- hand-computed cases
# f(x) = x²/2 from x = 1, γ = 0.5, η′ = 0.1, α = 0.75, ε = 0, worked out by hand from Algorithm 1:
#   ℓ=1: x′ = 1 − 0.1·(1 + 0) = 0.9,                    μ = 0.25·1 + 0.75·0.9 = 0.925
#   ℓ=2: x′ = 0.9 − 0.1·(0.9 + 0.5·(0.9−1)) = 0.815,    μ = 0.25·0.925 + 0.75·0.815 = 0.8425
#   outer: x ← 1 − (1 − μ), or with the γ factor x ← 1 − 0.5·(1 − μ).
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("langevin_steps", "scale_outer_by_gamma", "expected"),
    [
        (1, False, 0.925),
        (1, True, 1 - 0.5 * 0.075),
        (2, False, 0.8425),
        (2, True, 1 - 0.5 * 0.1575),
    ],
)
def test_hand_computed_steps(langevin_steps, scale_outer_by_gamma, expected, foreach):
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = EntropySGD(
        [x],
        **plain(langevin_steps=langevin_steps, scale_outer_by_gamma=scale_outer_by_gamma),
        foreach=foreach,
    )
    opt.step(quadratic_closure(opt, x))
    assert x.item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_hand_computed_with_momentum(foreach):
    # Momentum 0.5 in both loops (torch semantics: first buffer = first gradient), L = 2, two outer steps.
    #   step 1, ℓ=1: b=1, x′=0.9, μ=0.925; ℓ=2: b=0.5·1+0.9=1.4, x′=0.9−0.1·(1.4−0.05)=0.765,
    #                μ=0.25·0.925+0.75·0.765=0.805; outer: Δ=0.195, B=Δ, x=1−0.195=0.805
    #   step 2, ℓ=1: b=0.805, x′=0.7245, μ=0.744625; ℓ=2: b=0.4025+0.7245=1.127,
    #                x′=0.7245−0.1·(1.127−0.04025)=0.615825, μ=0.648025;
    #                outer: Δ=0.156975, B=0.5·0.195+Δ=0.254475, x=0.805−0.254475=0.550525
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = EntropySGD([x], **plain(langevin_steps=2, momentum=0.5), foreach=foreach)
    closure = quadratic_closure(opt, x)
    opt.step(closure)
    assert x.item() == pytest.approx(0.805, abs=1e-15)
    opt.step(closure)
    assert x.item() == pytest.approx(0.550525, abs=1e-15)
    assert opt.state[x]["momentum_buffer"].item() == pytest.approx(0.254475, abs=1e-15)


def test_closure_called_langevin_steps_times_and_first_loss_returned():
    x = torch.tensor([2.0], requires_grad=True)
    opt = EntropySGD([x], **plain(langevin_steps=4))
    losses = []
    inner = quadratic_closure(opt, x)

    def closure():
        losses.append(inner().item())
        return torch.tensor(losses[-1])

    returned = opt.step(closure)
    assert len(losses) == 4
    assert returned.item() == losses[0] == pytest.approx(2.0)  # the loss at x itself
    assert opt.gradient_evaluations == 4
    opt.step(closure)
    assert opt.gradient_evaluations == 8


def test_missing_closure_says_what_it_must_do():
    x = torch.tensor([1.0], requires_grad=True)
    opt = EntropySGD([x], langevin_steps=3)
    with pytest.raises(RuntimeError, match=r"closure.*FRESH minibatch.*backward"):
        opt.step()


# ----------------------------------------------------------------------------- L = 0 is torch SGD
def _torch_sgd_combinations():
    combinations = []
    for momentum, dampening, nesterov, weight_decay, foreach in itertools.product(
        [0.0, 0.9], [0.0, 0.5], [False, True], [0.0, 0.01], [False, True]
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch.optim.SGD rejects these
        combinations.append((momentum, dampening, nesterov, weight_decay, foreach))
    return combinations


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "weight_decay", "foreach"), _torch_sgd_combinations()
)
def test_zero_langevin_steps_is_torch_sgd(momentum, dampening, nesterov, weight_decay, foreach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    twin = copy.deepcopy(model)
    hyper = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
    ours = EntropySGD(model.parameters(), langevin_steps=0, inner_momentum=None, foreach=foreach, **hyper)
    reference = torch.optim.SGD(twin.parameters(), foreach=foreach, **hyper)
    data = [(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(5)]
    for (x, y), use_closure in zip(data, [True, False, True, False, True], strict=True):
        for net, opt in ((model, ours), (twin, reference)):

            def closure(net=net, opt=opt, x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:  # the closure is optional when L = 0
                closure()
                opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("foreach", [False, True])
def test_weight_decay_without_momentum_decays_exactly_once(foreach):
    w = torch.tensor([1.0], requires_grad=True)
    opt = EntropySGD([w], lr=1.0, langevin_steps=0, weight_decay=0.1, momentum=0.0, foreach=foreach)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert w.item() == pytest.approx(0.9, abs=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_weight_decay_acts_inside_the_langevin_loop(foreach):
    # Zero loss gradient, L = 1, α = 1, lr = 1: x_new = x′ = x − η′·λ·x.
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = EntropySGD([w], **plain(langevin_steps=1, alpha=1.0, weight_decay=0.1), foreach=foreach)

    def closure():
        opt.zero_grad()
        loss = 0.0 * w.sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert w.item() == pytest.approx(1.0 - 0.1 * 0.1, abs=1e-15)


# -------------------------------------------------------------------- a literal reading of Algorithm 1
def algorithm_1(
    x,
    grad_fn,
    steps,
    *,
    lr,
    langevin_steps,
    gamma_0,
    gamma_1,
    gamma_max,
    eta_prime,
    alpha,
    momentum,
    inner_momentum,
    nesterov,
    scale_outer_by_gamma,
):
    """Algorithm 1 written out line by line for one tensor, ε = 0, dampening 0."""
    x = x.clone()
    outer_buffer = None
    for t in range(steps):
        gamma = min(gamma_0 * (1 + gamma_1) ** t, gamma_max)
        x_prime, mu, inner_buffer = x.clone(), x.clone(), None
        for _ in range(langevin_steps):
            g = grad_fn(x_prime)
            if inner_momentum:
                inner_buffer = g.clone() if inner_buffer is None else inner_momentum * inner_buffer + g
                g = g + inner_momentum * inner_buffer if nesterov else inner_buffer
            x_prime = x_prime - eta_prime * (g - gamma * (x - x_prime))
            mu = (1 - alpha) * mu + alpha * x_prime
        delta = (gamma if scale_outer_by_gamma else 1.0) * (x - mu)
        if momentum:
            outer_buffer = delta.clone() if outer_buffer is None else momentum * outer_buffer + delta
            delta = delta + momentum * outer_buffer if nesterov else outer_buffer
        x = x - lr * delta
    return x


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        dict(
            momentum=0.0, inner_momentum=0.0, nesterov=False, scale_outer_by_gamma=False, gamma_max=math.inf
        ),
        dict(momentum=0.5, inner_momentum=0.9, nesterov=True, scale_outer_by_gamma=True, gamma_max=math.inf),
        dict(momentum=0.3, inner_momentum=0.0, nesterov=False, scale_outer_by_gamma=True, gamma_max=0.6),
    ],
)
def test_matches_algorithm_1_over_several_steps(settings, foreach):
    torch.manual_seed(1)
    curvature = torch.rand(7, dtype=torch.float64) * 2 + 0.1
    x0 = torch.randn(7, dtype=torch.float64)
    common = dict(lr=0.7, langevin_steps=3, gamma_0=0.5, gamma_1=0.2, eta_prime=0.05, alpha=0.6, **settings)
    expected = algorithm_1(x0, lambda z: curvature * z, 6, **common)

    x = x0.clone().requires_grad_(True)
    opt = EntropySGD([x], epsilon=0.0, foreach=foreach, **common)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (curvature * x**2).sum()
        loss.backward()
        return loss

    for _ in range(6):
        opt.step(closure)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- noise
def zero_gradient_closure(opt, param):
    def closure():
        opt.zero_grad()
        loss = 0.0 * param.sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("foreach", [False, True])
def test_noise_spread_matches_sqrt_eta_prime_epsilon(foreach):
    # Zero gradients and γ = 0: x′_ℓ = x + s(ξ₁+…+ξ_ℓ), s = √η′·ε. With L = 2, α = 0.5:
    # μ = x + s(0.75ξ₁ + 0.5ξ₂), so the update has std lr·s·√(0.75² + 0.5²) and mean 0.
    eta_prime, epsilon, lr = 0.04, 0.3, 0.5
    x = torch.zeros(200_000, requires_grad=True)
    opt = EntropySGD(
        [x], **plain(lr=lr, langevin_steps=2, alpha=0.5, gamma_0=0.0, eta_prime=eta_prime, epsilon=epsilon),
        seed=7, foreach=foreach,
    )  # fmt: skip
    opt.step(zero_gradient_closure(opt, x))
    expected_std = lr * math.sqrt(eta_prime) * epsilon * math.sqrt(0.75**2 + 0.5**2)
    update = x.detach()
    assert update.std().item() == pytest.approx(expected_std, rel=0.01)  # std error of the std ≈ 0.16 %
    assert abs(update.mean().item()) < 5 * expected_std / math.sqrt(update.numel())
    assert update.abs().min() > 0  # every element got noise


def test_epsilon_zero_is_deterministic_whatever_the_seed():
    results = []
    for seed in (1, 2):
        x = torch.linspace(-1, 1, 50, requires_grad=True)
        opt = EntropySGD([x], **plain(langevin_steps=3), seed=seed)
        for _ in range(3):
            opt.step(quadratic_closure(opt, x))
        results.append(x.detach().clone())
    assert torch.equal(results[0], results[1])


def test_seed_fixes_the_noise_and_different_seeds_differ():
    def run(seed):
        x = torch.zeros(100, requires_grad=True)
        opt = EntropySGD([x], **plain(langevin_steps=2, epsilon=1.0), seed=seed)
        opt.step(zero_gradient_closure(opt, x))
        return x.detach().clone()

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_seed_none_follows_torch_manual_seed():
    def run():
        torch.manual_seed(11)
        x = torch.zeros(10, requires_grad=True)
        opt = EntropySGD([x], **plain(langevin_steps=1, epsilon=1.0))
        opt.step(zero_gradient_closure(opt, x))
        return x.detach().clone()

    assert torch.equal(run(), run())


# ----------------------------------------------------------------------------- scoping
def test_scope_advances_once_per_outer_step_per_group_and_the_cap_holds():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = EntropySGD(
        [
            {"params": [a], "gamma_0": 0.1, "gamma_1": 0.5},
            {"params": [b], "gamma_0": 0.2, "gamma_1": 1.0, "gamma_max": 1.0},
        ],
        **{k: v for k, v in plain(langevin_steps=3).items() if not k.startswith("gamma")},
    )

    def closure():
        opt.zero_grad()
        loss = (a**2).sum() + (b**2).sum()
        loss.backward()
        return loss

    group_a, group_b = opt.param_groups
    assert EntropySGD.scope(group_a) == pytest.approx(0.1)  # the first step uses γ₀
    for t in range(1, 6):
        opt.step(closure)
        assert group_a["outer_steps"] == group_b["outer_steps"] == t  # not L per step
        assert EntropySGD.scope(group_a) == pytest.approx(0.1 * 1.5**t)
        assert EntropySGD.scope(group_b) == pytest.approx(min(0.2 * 2.0**t, 1.0))
    assert EntropySGD.scope(group_b) == 1.0


def test_scope_survives_overflow_with_a_cap():
    x = torch.ones(1, requires_grad=True)
    opt = EntropySGD([x], gamma_0=1.0, gamma_1=1.0, gamma_max=5.0)
    opt.param_groups[0]["outer_steps"] = 10_000  # 2**10000 overflows a float
    assert EntropySGD.scope(opt.param_groups[0]) == 5.0


def test_lr_scheduler_changes_the_outer_step():
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = EntropySGD([x], **plain(langevin_steps=1))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    closure = quadratic_closure(opt, x)
    opt.step(closure)  # lr 1: x = 0.925 (hand-computed case above)
    scheduler.step()
    opt.step(closure)  # lr 0.5: x ← x − 0.5·(x − μ), μ = x(1 − 0.75·0.1) = 0.925x
    assert x.item() == pytest.approx(0.925 - 0.5 * 0.925 * 0.075, abs=1e-15)


# ----------------------------------------------------------------------------- groups and missing grads
@pytest.mark.parametrize("foreach", [False, True])
def test_two_groups_behave_as_two_optimizers(foreach):
    torch.manual_seed(2)
    first, second = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    first_twin, second_twin = copy.deepcopy(first), copy.deepcopy(second)
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(12)]
    settings_a = dict(lr=0.5, momentum=0.9, nesterov=True, inner_momentum=0.5, gamma_0=0.1, gamma_1=0.1)
    settings_b = dict(lr=1.0, momentum=0.0, nesterov=False, inner_momentum=0.0, gamma_0=0.3, gamma_1=0.0)
    common = dict(langevin_steps=3, epsilon=0.0, eta_prime=0.1, foreach=foreach)
    joint = EntropySGD(
        [dict(params=first.parameters(), **settings_a), dict(params=second.parameters(), **settings_b)],
        **common,
    )
    apart = [
        EntropySGD(first_twin.parameters(), **settings_a, **common),
        EntropySGD(second_twin.parameters(), **settings_b, **common),
    ]

    def closure_for(opt, nets, batches):
        def closure():
            x, y = next(batches)
            opt.zero_grad()
            loss = sum(nn.functional.cross_entropy(net(x), y) for net in nets)
            loss.backward()
            return loss

        return closure

    joint_closure = closure_for(joint, [first, second], iter(data))
    apart_closures = [
        closure_for(apart[0], [first_twin], iter(data)),
        closure_for(apart[1], [second_twin], iter(data)),
    ]
    for _ in range(4):
        joint.step(joint_closure)
        for opt, closure in zip(apart, apart_closures, strict=True):
            opt.step(closure)
    for net, twin in ((first, first_twin), (second, second_twin)):
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("langevin_steps", [0, 2])
def test_parameter_without_gradient_is_untouched(langevin_steps, foreach):
    used = torch.ones(4, requires_grad=True)
    unused = torch.ones(4, requires_grad=True)
    opt = EntropySGD(
        [used, unused], **plain(langevin_steps=langevin_steps, momentum=0.9, epsilon=0.1), foreach=foreach
    )
    for _ in range(2):
        opt.step(quadratic_closure(opt, used))
    assert not torch.equal(used.detach(), torch.ones(4))
    assert torch.equal(unused.detach(), torch.ones(4))
    assert unused.grad is None
    assert len(opt.state[unused]) == 0


def test_groups_with_different_langevin_steps_share_the_closure_calls():
    a = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = EntropySGD([{"params": [a], "langevin_steps": 2}, {"params": [b], "langevin_steps": 1}], **plain())
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * (a**2 + b**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 2
    assert a.item() == pytest.approx(0.8425, abs=1e-15)  # hand-computed L = 2 case
    assert b.item() == pytest.approx(0.925, abs=1e-15)  # hand-computed L = 1 case


# ----------------------------------------------------------------------------- state
def _train(model, opt, batches):
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _model_and_data(seed=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [(torch.randn(16, 10), torch.randint(0, 4, (16,))) for _ in range(12)]
    return model, data


SETTINGS = dict(lr=0.5, langevin_steps=2, momentum=0.9, inner_momentum=0.5, epsilon=1e-2, gamma_1=0.1, seed=5)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_round_trip_continues_bit_identically(foreach):
    model, data = _model_and_data()
    initial = copy.deepcopy(model.state_dict())
    opt = EntropySGD(model.parameters(), foreach=foreach, **SETTINGS)
    _train(model, opt, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    _train(model, opt, data[4:8])  # four steps in the uninterrupted run; 2 closure calls each

    fresh, _ = _model_and_data(seed=99)
    fresh_opt = EntropySGD(fresh.parameters(), foreach=foreach, **{**SETTINGS, "seed": 123})
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    _train(fresh, fresh_opt, data[4:8])

    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert fresh_opt.gradient_evaluations == opt.gradient_evaluations == 16
    assert fresh_opt.param_groups[0]["outer_steps"] == 8
    assert not torch.equal(next(model.parameters()), initial["0.weight"])


def test_deepcopy_of_the_optimizer_carries_its_generator():
    model, data = _model_and_data()
    opt = EntropySGD(model.parameters(), **SETTINGS)
    _train(model, opt, data[:2])
    # Copied together, the copy's parameter groups and state point at the copied model's parameters.
    twin_model, twin_opt = copy.deepcopy((model, opt))
    assert twin_opt.param_groups[0]["params"][0] is next(twin_model.parameters())
    _train(model, opt, data[2:5])
    _train(twin_model, twin_opt, data[2:5])
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_foreach_equals_single_tensor_in_float64_with_noise():
    results = []
    for foreach in (False, True):
        model, data = _model_and_data()
        model.double()
        data = [(x.double(), y) for x, y in data]
        opt = EntropySGD(model.parameters(), foreach=foreach, weight_decay=1e-3, **SETTINGS)
        _train(model, opt, data)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------------- precision and devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_parameters_all_move(dtype, foreach):
    torch.manual_seed(4)
    x = torch.randn(1000, dtype=dtype).requires_grad_(True)
    before = x.detach().clone()
    opt = EntropySGD([x], lr=1.0, langevin_steps=3, eta_prime=0.1, epsilon=1e-2, seed=0, foreach=foreach)
    opt.step(quadratic_closure(opt, x))
    assert x.dtype == dtype
    assert torch.isfinite(x).all()
    assert (x.detach() != before).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_foreach_matches_single_tensor(dtype):
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to("cuda", dtype)
        x, y = torch.randn(64, 32, device="cuda", dtype=dtype), torch.randint(0, 10, (64,), device="cuda")
        opt = EntropySGD(model.parameters(), foreach=foreach, **SETTINGS)
        _train(model, opt, [(x, y)] * 3)
        results.append([p.detach().float().cpu() for p in model.parameters()])
        assert all(p.is_cuda and p.dtype == dtype for p in model.parameters())
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("lr", -0.1),
        ("lr", math.nan),
        ("lr", math.inf),
        ("langevin_steps", -1),
        ("langevin_steps", 2.5),
        ("langevin_steps", True),
        ("gamma_0", -1e-4),
        ("gamma_1", -0.5),
        ("gamma_1", math.inf),
        ("gamma_max", -1.0),
        ("gamma_max", math.nan),
        ("eta_prime", -0.1),
        ("epsilon", math.nan),
        ("epsilon", -1e-4),
        ("alpha", 0.0),
        ("alpha", 1.5),
        ("momentum", -0.9),
        ("inner_momentum", -0.1),
        ("dampening", 2.0),
        ("weight_decay", -1e-4),
        ("nesterov", "yes"),
        ("scale_outer_by_gamma", 1),
        ("seed", -3),
        ("seed", 1.5),
        ("foreach", "sometimes"),
    ],
)
def test_invalid_values_name_the_argument(argument, value):
    x = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match=f"Invalid {argument} value: {value!r}"[:40].replace("(", r"\(")):
        EntropySGD([x], **{argument: value})


def test_gamma_max_below_gamma_0_is_rejected():
    x = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid gamma_max value"):
        EntropySGD([x], gamma_0=0.5, gamma_max=0.1)


def test_nesterov_rules():
    x = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match="Nesterov momentum requires a non-zero momentum"):
        EntropySGD([x], nesterov=True, momentum=0.0, inner_momentum=0.0)
    with pytest.raises(ValueError, match="Nesterov momentum requires a non-zero momentum"):
        EntropySGD([x], nesterov=True, momentum=0.0, inner_momentum=None)
    with pytest.raises(ValueError, match="zero dampening"):
        EntropySGD([x], nesterov=True, momentum=0.9, dampening=0.1)
    EntropySGD([x], nesterov=True, momentum=0.0, inner_momentum=0.9)  # momentum in the inner loop is enough


def test_per_group_values_are_validated_too():
    x, y = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid alpha value: 0"):
        EntropySGD([{"params": [x]}, {"params": [y], "alpha": 0}])


# ----------------------------------------------------------------------------- convergence
def test_mu_approaches_the_proximal_point_on_a_quadratic():
    # With ε = 0, no momentum and many Langevin steps, x′ converges to the proximal point
    # argmin f(x′) + γ/2|x′ − x|² = γx/(a + γ) per coordinate, and μ (= x after an outer step, lr 1) follows.
    curvature = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)
    start = x.detach().clone()
    gamma = 10.0
    opt = EntropySGD([x], **plain(langevin_steps=400, gamma_0=gamma, eta_prime=0.05, alpha=0.2))

    def closure():
        opt.zero_grad()
        loss = 0.5 * (curvature * x**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    proximal = gamma * start / (curvature + gamma)
    torch.testing.assert_close(x.detach(), proximal, rtol=1e-6, atol=1e-8)


def _digits_splits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=0.15, random_state=0, stratify=y_train
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def _logistic_regression(make_optimizer, train, budget, seed=0):
    """Train a linear classifier for `budget` gradient evaluations (minibatches of 64)."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    opt = make_optimizer(model.parameters())
    x, y = train
    generator = torch.Generator().manual_seed(seed)

    def minibatches():
        while True:
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - 63, 64):
                yield x[order[start : start + 64]], y[order[start : start + 64]]

    stream = minibatches()

    def closure():
        xb, yb = next(stream)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    spent = 0
    while spent < budget:
        if isinstance(opt, EntropySGD):
            opt.step(closure)
            spent = opt.gradient_evaluations
        else:
            opt.step(closure)
            spent += 1
    return model


def _accuracy(model, split):
    x, y = split
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_entropy_sgd_reaches_tuned_sgd_on_digits_logistic_regression():
    train, val, test = _digits_splits()
    budget = 1000  # gradient evaluations, the same for both
    candidates = {
        lr: _logistic_regression(
            lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True), train, budget
        )
        for lr in (0.03, 0.1, 0.3, 1.0)
    }
    best_lr = max(candidates, key=lambda lr: _accuracy(candidates[lr], val))  # tuned on validation only
    sgd_test = _accuracy(candidates[best_lr], test)
    entropy = _logistic_regression(
        lambda p: EntropySGD(p, langevin_steps=5, eta_prime=0.5, seed=0), train, budget
    )
    entropy_test = _accuracy(entropy, test)
    assert sgd_test > 0.93  # the problem is learnt at all
    assert entropy_test >= sgd_test - 0.015, (entropy_test, sgd_test, best_lr)
