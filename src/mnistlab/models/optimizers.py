"""Optimizers and learning-rate schedules by name, and the per-batch step that applies them.

A step of the report's small networks takes well under a millisecond of arithmetic, so the Python work
inside `Optimizer.step()` (grouping tensors, hooks, profiler records) is a real share of it:
`make_step` calls the fused kernel directly where it can (benchmarks/epoch_speed.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mnistlab.config import OptimizerConfig, TrainingConfig
from mnistlab.errors import MnistlabError


def make_optimizer(params, config: OptimizerConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer a config names, in its fastest form: fused (one kernel for all parameters) where PyTorch
    has it for the device, else foreach. On this CPU fused Adam alone cuts the seed-B epoch by about a quarter.
    Apple's MPS lacks some fused kernels, so it gets foreach throughout."""
    o = config
    fast = {"foreach": True} if device is not None and device.type == "mps" else {"fused": True}
    if o.name == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, **fast
        )
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **fast)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **fast)
    if o.name == "adagrad":
        return torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay, **fast)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    if o.name == "adadelta":
        return torch.optim.Adadelta(params, lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    raise MnistlabError(f"unknown optimizer {o.name!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainingConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule, stepped once per batch; None for a constant rate (no per-step cost)."""
    if t.scheduler == "none" and not t.warmup_epochs:
        return None
    total = t.epochs * steps_per_epoch
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if t.scheduler == "onecycle":
        # OneCycle needs at least two steps in each of its phases (PyTorch divides by a phase's length less one).
        if total < 4:
            raise MnistlabError(f"the onecycle schedule needs at least 4 steps, but this run has {total}")
        warmup = min(max(warmup, 2), total - 2) if warmup else 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=warmup / total if warmup else 0.3,
            cycle_momentum="momentum" in optimizer.defaults and optimizer.defaults["momentum"] > 0,
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.scheduler == "step":
            return t.gamma ** (step // (t.step_size * steps_per_epoch))
        if t.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able values, for checkpoints."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in saved["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    # Checkpoints store tensors contiguous; give each per-parameter buffer its parameter's memory layout
    # again (channels-last convolutions), as fused optimizers expect them to match.
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state[param].items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# The private fused kernels `make_step` calls directly, by optimizer class.
_KERNELS = {torch.optim.SGD: "_fused_sgd_", torch.optim.Adam: "_fused_adam_", torch.optim.AdamW: "_fused_adamw_"}


def make_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A function that does what `optimizer.step()` does with the gradients in each parameter's `.grad`.

    For fused Adam, AdamW and SGD with a single parameter group (what `make_optimizer` builds) it calls
    PyTorch's fused kernel directly with the optimizer's own state tensors, so the state dict, schedulers
    and checkpoints see no difference, and the parameters come out bit for bit the same (tests/test_fast_paths.py).
    The first call goes through `optimizer.step()`, which creates the state the way PyTorch does.
    Anything else gets `optimizer.step` itself, and so does every optimizer where this PyTorch lacks the
    private kernel (they are not public API; pyproject caps torch at the versions this was tested on).
    """
    groups = optimizer.param_groups
    defaults = optimizer.defaults
    kernel_name = next((name for kind, name in _KERNELS.items() if type(optimizer) is kind), None)
    fusable = (
        kernel_name is not None
        and hasattr(torch, kernel_name)
        and len(groups) == 1
        and defaults.get("fused")
        and not defaults.get("amsgrad")
        and not defaults.get("maximize")
        and not defaults.get("differentiable")
    )
    if not fusable:
        return optimizer.step
    kernel = getattr(torch, kernel_name)
    group = groups[0]
    params: list[torch.Tensor] = group["params"]
    state: list[list[torch.Tensor]] = []  # the optimizer's per-parameter tensors, looked up once

    def step() -> None:
        if not state:
            optimizer.step()  # creates the state exactly as PyTorch does
            state.extend(_state_lists(optimizer, params))
            return
        grads = [p.grad for p in params]
        if isinstance(optimizer, torch.optim.SGD):
            kernel(
                params, grads, *state, weight_decay=group["weight_decay"], momentum=group["momentum"],
                lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
                is_first_step=False,
            )  # fmt: skip
            return
        steps, exp_avgs, exp_avg_sqs = state
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        kernel(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip

    return step


def _state_lists(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The state tensors the fused kernel takes, one list per kind, in parameter order."""
    if isinstance(optimizer, torch.optim.SGD):
        if optimizer.defaults["momentum"] == 0:
            return [[]]  # plain SGD keeps no buffers
        return [[optimizer.state[p]["momentum_buffer"] for p in params]]
    return [[optimizer.state[p][key] for p in params] for key in ("step", "exp_avg", "exp_avg_sq")]
