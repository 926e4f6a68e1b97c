"""fastdl.optim.Adam / AdamW: drop-ins for torch.optim.Adam / AdamW on the fused
fastdl::adamw_step kernels (fastdl/_ops/adamw.py).

Same defaults, param groups, hyperparameters and state layout as torch's
('step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'), so state dicts load both
ways, plus:

  master_weights=True    an fp32 copy ('master_param' in the state) of every
                         fp16/bf16 param; the kernel updates it and writes the
                         rounded low-precision param in the same pass.
  state_dtype            dtype of the moments: None (the param's dtype, or fp32
                         with master weights), torch.float32 or torch.bfloat16
                         (half the memory; the math stays fp32).
  stochastic_rounding    bf16 params are rounded stochastically (unbiased), from
                         a counter-based hash of (seed, tensor, step, element).
  max_grad_norm          clip all grads (every group) to this global L2 norm, as
                         torch.nn.utils.clip_grad_norm_ would, without touching
                         .grad and without a host sync: one norm pass, and the
                         coefficient applied inside the update.
                         `last_grad_norm` holds the norm (a device tensor).

Steps never sync with the host: the step count of each param lives on its
device (as in torch's fused and capturable modes), and torch.amp.GradScaler's
scale and found-inf flag are read by the kernel, which unscales in the same
pass and skips the step (step count included) on inf/NaN. Unlike torch's fused
kernel, .grad is left as it was (still scaled under GradScaler).
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from fastdl._ops import adamw as ops

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_STATE_DTYPES = (None, torch.float32, torch.bfloat16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class Adam(torch.optim.Optimizer):
    """torch.optim.Adam on the fused kernels; see the module docstring for the
    extra options. `weight_decay` is the coupled L2 penalty unless
    `decoupled_weight_decay=True` (then this is AdamW)."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, master_weights: bool = False, state_dtype=None,
                 max_grad_norm: float | None = None, stochastic_rounding: bool = False,
                 seed: int = 0, decoupled_weight_decay: bool = False):
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"fastdl: a Tensor lr must have one element, got shape {list(lr.shape)}")
        elif not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        betas = tuple(float(b) for b in betas)
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"fastdl: state_dtype must be None, torch.float32 or torch.bfloat16, "
                             f"got {state_dtype}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"fastdl: max_grad_norm must be positive or None, got {max_grad_norm}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=None, capturable=capturable,
                        differentiable=False, fused=None,
                        decoupled_weight_decay=decoupled_weight_decay,
                        master_weights=master_weights, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.last_grad_norm: Tensor | None = None
        # GradScaler sets self.grad_scale / self.found_inf and calls step()
        # directly; the kernel unscales and skips (torch's fused contract).
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None),
                               ("capturable", False), ("differentiable", False), ("fused", None),
                               ("decoupled_weight_decay", False), ("master_weights", False),
                               ("state_dtype", None), ("stochastic_rounding", False)):
                group.setdefault(key, value)

    # --- state ----------------------------------------------------------------------------
    @staticmethod
    def _state_dtype(group, p: Tensor) -> torch.dtype:
        if p.is_complex():
            return p.dtype
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float32 if group["master_weights"] and p.dtype in _LOW_PRECISION else p.dtype

    @staticmethod
    def _wants_master(group, p: Tensor) -> bool:
        return group["master_weights"] and p.dtype in _LOW_PRECISION

    def _init_state(self, group, p: Tensor, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        dtype = self._state_dtype(group, p)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if self._wants_master(group, p):
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                  copy=True)

    def _conform_state(self, group, p: Tensor, state: dict, saved: dict) -> None:
        """After a load: steps on the param's device in fp32, moments in this
        group's state dtype (from the saved values, not from torch's cast to the
        param dtype), an fp32 master copy exactly where master weights apply."""
        if not state:
            return
        step = torch.as_tensor(state["step"])
        state["step"] = step.to(device=p.device, dtype=torch.float32, copy=True).reshape(())
        dtype = self._state_dtype(group, p)
        for key in _MOMENTS:
            if key in state:
                src = saved.get(key, state[key])
                state[key] = torch.empty_like(p, dtype=dtype).copy_(src)
        if self._wants_master(group, p):
            src = saved.get("master_param", p.detach())
            state["master_param"] = src.to(device=p.device, dtype=torch.float32, copy=True)
        else:
            state.pop("master_param", None)

    def load_state_dict(self, state_dict) -> None:
        # A torch.optim.Adam(W) state dict lacks our options: keep the current ones.
        groups = [{**{k: v for k, v in g.items() if k != "params"}, **saved}
                  for g, saved in zip(self.param_groups, state_dict["param_groups"])]
        groups += state_dict["param_groups"][len(groups):]
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        # torch casts every state tensor to its param's dtype on load; keep the
        # originals of ours (fp32 moments and master copies of bf16 params).
        saved = {i: {k: v for k, v in state_dict["state"].get(i, {}).items()
                     if isinstance(v, Tensor) and k != "step"} for i in saved_ids}
        super().load_state_dict({**state_dict, "param_groups": groups})
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        for i, p in zip(saved_ids, params):
            self._conform_state(owner[id(p)], p, self.state[p], saved[i])

    # --- step -------------------------------------------------------------------------------
    def _collect(self, group):
        """Per call of the kernel: lists of the params with grads, split by
        whether they carry a master copy (the op takes all or none)."""
        calls: dict[bool, list[list]] = {}
        device = None
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"fastdl: {type(self).__name__} does not support sparse gradients")
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(f"fastdl: every param of a param group must be on one device, got "
                                 f"{device} and {p.device}; put each device's params in its own group")
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"fastdl: params must be floating point or complex, got {p.dtype}")
            if g.dtype != p.dtype:
                raise TypeError(f"fastdl: a grad must have its param's dtype {p.dtype}, got {g.dtype}")
            state = self.state[p]
            if not state:
                self._init_state(group, p, state)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
            master = state.get("master_param")
            # The update is elementwise: sharded (DTensor, FSDP2) params are
            # updated shard by shard through their local tensors.
            tensors = [_local(t) for t in (p, g, state["exp_avg"], state["exp_avg_sq"],
                                           state.get("max_exp_avg_sq"), master)]
            if tensors[1].stride() != tensors[0].stride():
                tensors[1] = torch.empty_like(tensors[0]).copy_(tensors[1])
            if self.max_grad_norm is not None and tensors[0] is not p:
                raise NotImplementedError(
                    "fastdl: max_grad_norm needs the global norm of sharded (DTensor) grads, which "
                    "fastdl.optim does not all-reduce yet; clip with torch.nn.utils.clip_grad_norm_ "
                    "before step() and leave max_grad_norm=None")
            lists = calls.setdefault(master is not None, [[] for _ in range(7)])
            if p.is_complex():
                tensors = [torch.view_as_real(t) if t is not None else None for t in tensors]
            for lst, t in zip(lists, tensors):
                if t is not None:
                    lst.append(t)
            lists[6].append(_local(state["step"]))
        return device, list(calls.values())

    def _grad_norm(self, work, grad_scale) -> dict:
        """Global L2 norm of every grad, per device that holds grads."""
        per_device: dict[torch.device, list[Tensor]] = {}
        for device, calls in work:
            for lists in calls:
                per_device.setdefault(device, []).extend(lists[1])
        if not per_device:
            return {}
        norms = {d: ops.grad_norm(grads) for d, grads in per_device.items()}
        first = next(iter(norms))
        total = norms[first]
        if len(norms) > 1:
            total = torch.stack([n.to(first, non_blocking=True) for n in norms.values()]).square().sum().sqrt()
        self.last_grad_norm = total / grad_scale.to(first) if grad_scale is not None else total
        return {d: total.to(d, non_blocking=True) for d in norms}

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss (None without one)."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or \
            getattr(self, "_cuda_graph_capture_health_check")
        check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        work = [(group, *self._collect(group)) for group in self.param_groups]
        norms = {}
        if self.max_grad_norm is not None:
            norms = self._grad_norm([(d, calls) for _, d, calls in work], grad_scale)
        for group, device, calls in work:
            if not calls:
                continue
            lr = group["lr"]
            lr_tensor = lr.to(device=device, dtype=torch.float32).reshape(1) if isinstance(lr, Tensor) else None
            for params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps in calls:
                ops.fused_step(
                    params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps,
                    lr=0.0 if lr_tensor is not None else lr, lr_tensor=lr_tensor,
                    beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled=group["decoupled_weight_decay"], maximize=group["maximize"],
                    grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device),
                    grad_norm=norms.get(device), max_grad_norm=self.max_grad_norm or 0.0,
                    stochastic_rounding=group["stochastic_rounding"], seed=self.seed)
        return loss


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()


def _local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (a view: writes land in the DTensor), else t."""
    return t.to_local() if isinstance(t, DTensor) else t


def _on(t: Tensor | None, device) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)


class AdamW(Adam):
    """torch.optim.AdamW on the fused kernels (decoupled weight decay, default
    1e-2); see the module docstring for the extra options."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, master_weights: bool = False, state_dtype=None,
                 max_grad_norm: float | None = None, stochastic_rounding: bool = False,
                 seed: int = 0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, master_weights=master_weights,
                         state_dtype=state_dtype, max_grad_norm=max_grad_norm,
                         stochastic_rounding=stochastic_rounding, seed=seed,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        # As torch.optim.AdamW: whatever was loaded, this is AdamW.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
