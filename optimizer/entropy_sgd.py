r"""Entropy-SGD (Chaudhari et al., ICLR 2017) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

__all__ = ["EntropySGD"]

_MISSING_CLOSURE = (
    "EntropySGD.step() needs a closure when langevin_steps > 0: a function that zeroes the gradients, "
    "evaluates the loss on a FRESH minibatch at the current parameters, calls loss.backward() and returns "
    "the loss. It is called langevin_steps times per step."
)


class EntropySGD(Optimizer):
    r"""Entropy-SGD: gradient descent on the local entropy, estimated by Langevin dynamics.

    Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina,
    "Entropy-SGD: Biasing Gradient Descent Into Wide Valleys", ICLR 2017 (arXiv:1611.01838), Algorithm 1.

    One call of :meth:`step` with :math:`L` = ``langevin_steps`` :math:`\ge 1` performs, for every parameter
    group, with :math:`t` the outer steps the group has already taken:

    .. math::
        \begin{aligned}
            &\gamma_t = \min\big(\gamma_0 (1+\gamma_1)^t,\ \gamma_{\max}\big)                      \\
            &x' \leftarrow x, \quad \mu \leftarrow x                                               \\
            &\textbf{for } \ell = 1 \dots L \textbf{ (closure call } \ell \textbf{, a fresh minibatch)}: \\
            &\quad g \leftarrow \nabla f(x') + \lambda x'                                          \\
            &\quad g \leftarrow \operatorname{momentum}_{\text{inner}}(g)
                \quad\text{(torch SGD semantics, buffer restarted at } \ell = 1)                   \\
            &\quad x' \leftarrow x' - \eta' \big(g + \gamma_t (x' - x)\big)
                + \sqrt{\eta'}\,\varepsilon\,\xi, \quad \xi \sim \mathcal{N}(0, I)                  \\
            &\quad \mu \leftarrow (1-\alpha)\,\mu + \alpha\, x'                                    \\
            &\Delta \leftarrow s\,(x - \mu), \quad s = \gamma_t \text{ if scale\_outer\_by\_gamma else } 1 \\
            &x \leftarrow x - \eta \operatorname{momentum}_{\text{outer}}(\Delta)
                \quad\text{(exactly torch.optim.SGD on the "gradient" } \Delta)
        \end{aligned}

    With :math:`L = 0` the step is exactly ``torch.optim.SGD`` with the group's ``lr``, ``momentum``,
    ``dampening``, ``nesterov`` and ``weight_decay``, and the closure is optional.

    Conventions, and how they relate to the public references (ucla-vision/entropy-sgd, Lua and PyTorch):

    * ``alpha`` weighs the NEWEST Langevin iterate, as in the paper (0.75). Both public codes average with
      :math:`\mu \leftarrow 0.75\mu + 0.25x'`, i.e. ``alpha=0.25`` here.
    * The noise on :math:`x'` has standard deviation :math:`\sqrt{\eta'}\varepsilon` (paper). The codes use
      :math:`\varepsilon\sqrt{2\eta'}`; pass ``epsilon * sqrt(2)`` to reproduce them.
    * :math:`\gamma` advances once per outer step and the first step uses :math:`\gamma_0`. The Lua code
      increments before use (its first step uses :math:`t=1`); the PyTorch port never increments it.
    * The closure is called exactly :math:`L` times per step; the first call is at :math:`x' = x` and its loss
      is what :meth:`step` returns. The PyTorch port calls it :math:`L+1` times.
    * Momentum follows ``torch.optim.SGD`` everywhere (first buffer = first gradient). The PyTorch port
      starts the outer buffer from a copy of the raw gradient and the inner one from zeros.
    * Every hyperparameter lives in ``param_groups``, so LR schedulers and per-group settings work, and the
      state is keyed by parameter, so ``state_dict`` round trips are exact (the port breaks both).
    * ``scale_outer_by_gamma=True`` is Algorithm 1 as printed; ``False`` (default) is the form the paper
      uses in practice, which keeps :math:`\gamma` out of the learning-rate schedule.
    * Weight decay acts inside the Langevin loop only (and in the :math:`L = 0` path, as in torch SGD).
    * Inner forward passes at :math:`x'` disturb BatchNorm running statistics; re-estimate them at
      :math:`x` with :func:`optimizer.reestimate_batchnorm` before evaluating.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: outer learning rate :math:`\eta` (what LR schedulers change). Default 1.0 (paper).
        langevin_steps: :math:`L`, inner SGLD steps per outer step (closure calls); 0 is plain SGD.
            Default 20 (paper, CNNs).
        gamma_0: initial scope :math:`\gamma_0`. Default 1e-4 (paper, LeNet).
        gamma_1: scoping rate :math:`\gamma_1 \ge 0`. Default 1e-3 (paper, LeNet).
        gamma_max: optional cap on :math:`\gamma_t`. Default None (no cap). Keep
            :math:`\eta'\gamma_t < 1`, or the coupling term overshoots the anchor.
        eta_prime: SGLD step size :math:`\eta'`. Default 0.1 (paper).
        epsilon: thermal noise :math:`\varepsilon`. Default 1e-4 (paper).
        alpha: weight of the newest iterate in :math:`\mu`, in (0, 1]. Default 0.75 (paper).
        momentum: outer momentum (and inner, unless ``inner_momentum`` is given). Default 0 (the paper's
            Lua code uses none outside).
        dampening: momentum dampening, torch SGD semantics. Default 0.
        nesterov: Nesterov momentum, in whichever loop has momentum. Default True (paper).
        inner_momentum: momentum of the Langevin loop when it should differ from ``momentum``.
            Default 0.9 (paper's Lua code); None means "same as ``momentum``".
        weight_decay: L2 penalty :math:`\lambda` added to the gradient inside the loop. Default 0.
        scale_outer_by_gamma: see above. Default False.
        seed: seed of the optimizer's own noise generator; None draws one from torch's global RNG,
            so ``torch.manual_seed`` makes runs reproducible.
        foreach: use the multi-tensor (``torch._foreach_*``) implementation. None picks it when every
            parameter is on CUDA, as torch does.

    Attributes:
        gradient_evaluations: closure calls (gradients consumed) so far; a step with :math:`L = 0` counts one.

    Example:
        >>> opt = EntropySGD(model.parameters(), lr=1.0, langevin_steps=5)
        >>> def closure():
        ...     x, y = next(batches)  # a fresh minibatch on every call
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # calls the closure 5 times, returns the first loss
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        langevin_steps: int = 20,
        gamma_0: float = 1e-4,
        gamma_1: float = 1e-3,
        gamma_max: float | None = None,
        eta_prime: float = 0.1,
        epsilon: float = 1e-4,
        alpha: float = 0.75,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = True,
        inner_momentum: float | None = 0.9,
        weight_decay: float = 0.0,
        scale_outer_by_gamma: bool = False,
        seed: int | None = None,
        foreach: bool | None = None,
    ) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed value: {seed!r} (a non-negative int or None)")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"Invalid foreach value: {foreach!r} (True, False or None)")
        defaults = dict(
            lr=lr,
            langevin_steps=langevin_steps,
            gamma_0=gamma_0,
            gamma_1=gamma_1,
            gamma_max=gamma_max,
            eta_prime=eta_prime,
            epsilon=epsilon,
            alpha=alpha,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            inner_momentum=inner_momentum,
            weight_decay=weight_decay,
            scale_outer_by_gamma=scale_outer_by_gamma,
            foreach=foreach,
        )
        self.seed = seed
        self.gradient_evaluations = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        group.setdefault("outer_steps", 0)  # t in gamma_t; saved with the groups by state_dict

    # ---------------------------------------------------------------- state that torch does not keep
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            seed=self.seed, gradient_evaluations=self.gradient_evaluations, _generators=self._generators
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_generators", {})
        state.setdefault("gradient_evaluations", 0)
        super().__setstate__(state)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["entropy_sgd"] = {
            "seed": self.seed,
            "gradient_evaluations": self.gradient_evaluations,
            "generator_states": {str(device): g.get_state() for device, g in self._generators.items()},
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("entropy_sgd", {})
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "entropy_sgd"})
        self.seed = extra.get("seed", self.seed)
        self.gradient_evaluations = extra.get("gradient_evaluations", 0)
        self._generators = {}
        for name, generator_state in extra.get("generator_states", {}).items():
            self._generator(torch.device(name)).set_state(generator_state)

    # ---------------------------------------------------------------- the algorithm
    @staticmethod
    def scope(group: dict[str, Any]) -> float:
        """γ_t of a parameter group for its next outer step: min(γ₀(1+γ₁)^t, γ_max)."""
        try:
            gamma = group["gamma_0"] * (1.0 + group["gamma_1"]) ** group["outer_steps"]
        except OverflowError:  # (1 + γ₁)^t beyond float range: only the cap is left
            gamma = math.inf
        cap = group["gamma_max"]
        return gamma if cap is None else min(gamma, cap)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Take one outer step; see the class docstring. Returns the loss of the first closure call."""
        langevin_steps = max(group["langevin_steps"] for group in self.param_groups)
        if langevin_steps > 0 and closure is None:
            raise RuntimeError(_MISSING_CLOSURE)

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.gradient_evaluations += 1

        # Groups with L = 0 are plain SGD on the gradient at x (the first call, made at x' = x).
        for group in self.param_groups:
            if group["langevin_steps"] == 0:
                self._sgd_step(group)
                group["outer_steps"] += 1

        loops = [_LangevinLoop(self, group) for group in self.param_groups if group["langevin_steps"] > 0]
        for ell in range(langevin_steps):
            if ell > 0:
                with torch.enable_grad():
                    closure()  # type: ignore[misc]
                self.gradient_evaluations += 1
            for loop in loops:
                if ell < loop.group["langevin_steps"]:
                    loop.langevin_step(first=ell == 0)
        for loop in loops:
            loop.outer_step()
            loop.group["outer_steps"] += 1
        return loss

    def _sgd_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params,
            [p.grad for p in params],
            buffers,
            foreach=self._use_foreach(group, params),
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"] != 0:
            for p, buffer in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["foreach"] is not None:
            return group["foreach"]
        return bool(params) and all(p.is_cuda for p in params)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]


class _LangevinLoop:
    """One outer step of one parameter group: anchors, the running average μ and the inner momentum."""

    def __init__(self, optimizer: EntropySGD, group: dict[str, Any]) -> None:
        self.optimizer = optimizer
        self.group = group
        # Parameters without a gradient at x are left untouched for the whole step, as torch does.
        self.params = [p for p in group["params"] if p.grad is not None]
        self.foreach = optimizer._use_foreach(group, self.params)
        self.gamma = EntropySGD.scope(group)
        inner_momentum = group["inner_momentum"]
        self.inner_momentum = group["momentum"] if inner_momentum is None else inner_momentum

        states = [optimizer.state[p] for p in self.params]
        self.anchors = [_buffer(state, "anchor", p) for state, p in zip(states, self.params, strict=True)]
        self.averages = [_buffer(state, "average", p) for state, p in zip(states, self.params, strict=True)]
        self.inner_buffers = (
            [_buffer(state, "inner_momentum_buffer", p) for state, p in zip(states, self.params, strict=True)]
            if self.inner_momentum != 0
            else []
        )
        _copy(self.anchors, self.params, self.foreach)
        _copy(self.averages, self.params, self.foreach)
        self.buckets = _buckets(self.params)
        self.noise_std = math.sqrt(group["eta_prime"]) * group["epsilon"]
        self.noise_buffers, self.noises = self._allocate_noise() if self.noise_std > 0 else ([], None)

    def langevin_step(self, *, first: bool) -> None:
        """x′ ← x′ − η′(momentum(∇f(x′) + λx′) + γ(x′ − x)) + √η′ε·ξ, then μ ← (1−α)μ + αx′."""
        group = self.group
        # A parameter that lost its gradient after the first call has a zero loss gradient there.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        noises = self._draw_noise() if self.noise_std > 0 else None
        kernel = _multi_tensor_langevin_step if self.foreach else _single_tensor_langevin_step
        for indices in self.buckets:
            kernel(
                [self.params[i] for i in indices],
                [grads[i] for i in indices],
                [self.anchors[i] for i in indices],
                [self.averages[i] for i in indices],
                [self.inner_buffers[i] for i in indices] if self.inner_buffers else [],
                [noises[i] for i in indices] if noises is not None else None,
                first=first,
                gamma=self.gamma,
                eta_prime=group["eta_prime"],
                noise_std=self.noise_std,
                alpha=group["alpha"],
                momentum=self.inner_momentum,
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
            )

    def outer_step(self) -> None:
        """x ← x − η·momentum(s·(x − μ)), torch SGD semantics, with the outer momentum buffer."""
        group = self.group
        if not self.params:
            return
        scale = self.gamma if group["scale_outer_by_gamma"] else 1.0
        # The averages become the "gradients" s·(x − μ); the parameters go back from x′ to x.
        if self.foreach:
            torch._foreach_sub_(self.averages, self.anchors)
            torch._foreach_mul_(self.averages, -scale)
            torch._foreach_copy_(self.params, self.anchors)
        else:
            for average, anchor, param in zip(self.averages, self.anchors, self.params, strict=True):
                average.sub_(anchor).mul_(-scale)
                param.copy_(anchor)
        states = [self.optimizer.state[p] for p in self.params]
        buffers = [state.get("momentum_buffer") for state in states]
        sgd(
            self.params,
            self.averages,
            buffers,
            foreach=self.foreach,
            weight_decay=0.0,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"] != 0:
            for state, buffer in zip(states, buffers, strict=True):
                state["momentum_buffer"] = buffer

    def _allocate_noise(self) -> tuple[list[Tensor], list[Tensor]]:
        """One flat buffer per (device, dtype) bucket and per-parameter views into it.

        Drawing one flat buffer costs one generator call instead of one per tensor, and both
        implementations consume the same numbers, so they stay equal with noise on.
        """
        flats: list[Tensor] = []
        noises: list[Tensor] = [torch.empty(0)] * len(self.params)
        for indices in self.buckets:
            first = self.params[indices[0]]
            flat = torch.empty(
                sum(self.params[i].numel() for i in indices), device=first.device, dtype=first.dtype
            )
            flats.append(flat)
            offset = 0
            for i in indices:
                numel = self.params[i].numel()
                noises[i] = flat[offset : offset + numel].view_as(self.params[i])
                offset += numel
        return flats, noises

    def _draw_noise(self) -> list[Tensor]:
        for flat in self.noise_buffers:
            flat.normal_(generator=self.optimizer._generator(flat.device))
        return self.noises  # type: ignore[return-value]


def _single_tensor_langevin_step(
    params: list[Tensor],
    grads: list[Tensor],
    anchors: list[Tensor],
    averages: list[Tensor],
    buffers: list[Tensor],
    noises: list[Tensor] | None,
    *,
    first: bool,
    gamma: float,
    eta_prime: float,
    noise_std: float,
    alpha: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = buffers[i]
            if first:
                buffer.copy_(grad)
            else:
                buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
        # x′ − η′γ(x′ − x) is a lerp of x′ towards the anchor x.
        param.lerp_(anchors[i], eta_prime * gamma)
        param.add_(grad, alpha=-eta_prime)
        if noises is not None:
            param.add_(noises[i], alpha=noise_std)
        averages[i].lerp_(param, alpha)


def _multi_tensor_langevin_step(
    params: list[Tensor],
    grads: list[Tensor],
    anchors: list[Tensor],
    averages: list[Tensor],
    buffers: list[Tensor],
    noises: list[Tensor] | None,
    *,
    first: bool,
    gamma: float,
    eta_prime: float,
    noise_std: float,
    alpha: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if first:
            torch._foreach_copy_(buffers, grads)
        else:
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads, alpha=1 - dampening)
        grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
    torch._foreach_lerp_(params, anchors, eta_prime * gamma)
    torch._foreach_add_(params, grads, alpha=-eta_prime)
    if noises is not None:
        torch._foreach_add_(params, noises, alpha=noise_std)
    torch._foreach_lerp_(averages, params, alpha)


def _buffer(state: dict[str, Any], key: str, param: Tensor) -> Tensor:
    """A per-parameter buffer, created once and reused on every step."""
    if key not in state:
        state[key] = torch.empty_like(param, memory_format=torch.preserve_format)
    return state[key]


def _copy(destinations: list[Tensor], sources: list[Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_copy_(destinations, sources)
    else:
        for destination, source in zip(destinations, sources, strict=True):
            destination.copy_(source)


def _buckets(params: list[Tensor]) -> list[list[int]]:
    """Indices of the parameters grouped by (device, dtype), in order: foreach kernels need one of each."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the argument and the bad value, in the style of torch.optim."""

    def number(name: str, *, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> float:
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number)")
        if value < low or (low_open and value == low) or value > high:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"Invalid {name} value: {value} (must be in {interval})")
        return float(value)

    number("lr")
    number("gamma_0")
    number("gamma_1")
    number("eta_prime")
    number("epsilon")
    number("alpha", low_open=True, high=1.0)
    momentum = number("momentum")
    dampening = number("dampening", high=1.0)
    number("weight_decay")
    steps = group["langevin_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid langevin_steps value: {steps!r} (must be an int >= 0)")
    if group["gamma_max"] is not None:
        cap = group["gamma_max"]
        if (
            isinstance(cap, bool)
            or not isinstance(cap, int | float)
            or math.isnan(cap)
            or cap < group["gamma_0"]
        ):
            raise ValueError(f"Invalid gamma_max value: {cap!r} (None, or a number >= gamma_0)")
    inner = group["inner_momentum"]
    if inner is not None:
        number("inner_momentum")
        inner = float(inner)
    for flag in ("nesterov", "scale_outer_by_gamma"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag} value: {group[flag]!r} (must be a bool)")
    if group["nesterov"]:
        inner_value = momentum if inner is None else inner
        if momentum == 0 and inner_value == 0:
            raise ValueError("Nesterov momentum requires a non-zero momentum or inner_momentum")
        if dampening != 0:
            raise ValueError(f"Nesterov momentum requires zero dampening, got dampening={dampening}")
