"""Fully sharded training (``train.fsdp``): FSDP2 through Accelerate's FSDP plugin, for towers whose
weights, gradients and optimizer state do not fit one GPU.

Every process holds 1/N of each parameter, of its gradient and of its optimizer state (torch's
``fully_shard``: one unit per block the model names in ``fsdp_units()``, gathered only for that
block's forward and backward, then the rest of the model as the root unit). Gradients are averaged
over processes as DDP averages them, so the losses are DDP's.

What leaves the run is unsharded, in the formats a DDP run writes:

- checkpoints hold the full state dicts, gathered onto the main process and written by
  :mod:`mmcl.checkpoint` with the same files, keys, shapes and optimizer numbering as DDP's, so a
  checkpoint resumes under either; resuming, the main process reads the files and the shards are
  sent from it (``broadcast_from_rank0``), so no other process holds the whole model;
- ``final/`` is written by :func:`mmcl.publish.write_final` from a copy of the model that lived on
  the meta device (no memory) until the gathered weights fill it on the main process.

Two things FSDP2 changes that this module undoes on the way out and redoes on the way in:

- ``fully_shard`` refuses 0-dim parameters (CLIP's ``logit_scale``, SigLIP's ``logit_bias``): they
  are held as 1-element vectors while sharded and written with their own shape (the optimizer's
  per-parameter tensors too; ``step`` is 0-dim for every parameter, as torch's optimizers keep it);
- torch's full optimizer state dict is keyed by parameter name: a checkpoint keeps torch's own
  numbering (the position in the optimizer's parameter groups).

Accelerate applies its FSDP plugin to GPU processes only: on CPU processes it would train with DDP,
so ``train.fsdp`` there is refused (:func:`check_launch`). The distributed tests switch Accelerate's
choice on their 2 CPU processes (``tests/dist/fsdp_worker.py``); ``benchmarks/fsdp_check.py``
checks the unswitched path on GPUs.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from mmcl.errors import MmclError

STEP = "step"  # the one per-parameter optimizer entry that is 0-dim whatever the parameter's shape


def plugin() -> Any:
    """Accelerate's FSDP plugin for ``train.fsdp``: FSDP2, each parameter sharded over every process
    and gathered again after each forward; the units (``transformer_cls_names_to_wrap``) are set from
    the model by :class:`Sharded`. Activation checkpointing and CPU offload keep Accelerate's settings
    (``accelerate launch`` flags or its config file)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=[], reshard_after_forward=True,
                                          state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)


def launch_error(e: Exception) -> MmclError | None:
    """Accelerate's error when an FSDP launch (``accelerate launch --use_fsdp``) finds no GPU, as one
    line with the fix; None for any other error."""
    if "no available devices" in str(e) and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return MmclError("the launch asks for FSDP (accelerate launch --use_fsdp) and this machine has no GPU: FSDP "
                         "runs on GPU processes; launch with --multi_gpu (and ACCELERATE_USE_CPU=1 on CPUs)")
    return None


def check_launch(acc: Any, wanted: bool) -> None:
    """The launch and ``train.fsdp`` agree: FSDP2 applied by Accelerate when asked, DDP otherwise."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if not wanted:
        if kind == DistributedType.FSDP:
            raise MmclError("the launch asks for FSDP (accelerate launch --use_fsdp, or its config file) and "
                            "train.fsdp is false: set train.fsdp: true (mmcl shards with FSDP2), or launch without "
                            "FSDP")
        return
    if acc.is_fsdp2:
        return
    if kind == DistributedType.FSDP:
        raise MmclError("train.fsdp shards with FSDP2 and the launch asks for FSDP1 (--fsdp_version 1, or "
                        "fsdp_version in the accelerate config): launch with --fsdp_version 2 or without FSDP flags")
    if acc.device.type == "cpu":
        raise MmclError(f"train.fsdp needs GPU processes: Accelerate applies its FSDP plugin to GPUs only (on these "
                        f"CPU processes, {kind.value}, it would train with DDP, unsharded); set train.fsdp: false "
                        "for a CPU run")
    raise MmclError(f"train.fsdp needs processes started by `accelerate launch` or `torchrun` (1 GPU is enough), "
                    f"and Accelerate sees {kind.value}")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (all of a replicated one, such as a gradient norm); a
    plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def vectorise_scalars(model: nn.Module) -> dict[str, torch.Size]:
    """Replace each 0-dim parameter (which ``fully_shard`` refuses) by a 1-element one of the same value;
    returns their names and original shapes."""
    shapes = {}
    for name, p in list(model.named_parameters()):
        if p.ndim == 0:
            owner, _, leaf = name.rpartition(".")
            vector = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
            setattr(model.get_submodule(owner), leaf, vector)
            shapes[name] = p.shape
    return shapes


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and saved buffers are on the meta device (no memory): the
    architecture, config and methods, to be filled with ``load_state_dict(..., assign=True)``."""
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers() if id(b) in saved})
    return copy.deepcopy(model, memo)


def check_modules(model: nn.Module, objective: nn.Module) -> None:
    """What FSDP2 in mmcl does not shard or keep in step: an objective's own parameters (trained heads,
    momentum copies of the model) and BatchNorm running statistics (DDP copies rank 0's to every
    process at each forward, FSDP does not)."""
    if next(objective.parameters(), None) is not None:
        raise MmclError(f"train.fsdp shards the model only, and objective {type(objective).__name__} holds parameters "
                        "of its own (trained heads or momentum copies of the model); use train.fsdp with objectives "
                        "without them (clip, siglip), or set train.fsdp: false")
    norms = [n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms:
        raise MmclError(f"train.fsdp does not keep BatchNorm running statistics equal over processes (DDP copies "
                        f"rank 0's at each forward) and the model has {len(norms)} BatchNorm layers ({norms[0]}, ...); "
                        "use GroupNorm/LayerNorm towers, or set train.fsdp: false")


def full_precision_reductions(plugin: Any) -> None:
    """Under mixed precision, FSDP2 reduces the gradients across processes in float32, as DDP does;
    parameters are gathered, and the towers run, in the low precision (their outputs stay in it, as
    under DDP's autocast: a float32 output would be cast up after every sharded block). Accelerate's
    own policy reduces in bf16: gradients summed over many GPUs in bf16 lose the small ones.

    >>> from types import SimpleNamespace; from torch.distributed.fsdp import MixedPrecisionPolicy
    >>> p = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16, torch.bfloat16))
    >>> full_precision_reductions(p); p.mixed_precision_policy.reduce_dtype, p.mixed_precision_policy.output_dtype
    (torch.float32, torch.bfloat16)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = getattr(plugin, "mixed_precision_policy", None)
    if isinstance(policy, MixedPrecisionPolicy) and policy.param_dtype in (torch.bfloat16, torch.float16):
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype,
                                                             reduce_dtype=torch.float32,
                                                             output_dtype=policy.output_dtype,
                                                             cast_forward_inputs=policy.cast_forward_inputs)


class Sharded:
    """The trainer's view of a model trained under FSDP2: made before the optimizer is built and the model
    prepared; then the full state dicts of model and optimizer for checkpoints, their loading on
    resume, and the unsharded model for ``final/``. Every method is a collective: every process calls
    it, and the main process gets the result."""

    def __init__(self, acc: Any, model: nn.Module, objective: nn.Module):
        from accelerate.utils import fsdp2_canonicalize_names

        check_modules(model, objective)
        self.is_main = acc.is_main_process
        self.skeleton = meta_copy(model) if self.is_main else None  # before the scalars change shape
        self.shapes = vectorise_scalars(model)
        units = getattr(model, "fsdp_units", lambda: [])()
        acc.state.fsdp_plugin.transformer_cls_names_to_wrap = list(units)
        full_precision_reductions(acc.state.fsdp_plugin)
        self._canonical = fsdp2_canonicalize_names

    # --------------------------------------------------------------------------- shapes
    def _out(self, name: str, key: str | None, t: Any) -> Any:
        """A state tensor of parameter ``name`` as a checkpoint holds it (scalars with their own shape)."""
        if name in self.shapes and isinstance(t, torch.Tensor) and key != STEP and t.shape == (1,):
            return t.reshape(self.shapes[name])
        return t

    def _in(self, name: str, key: str | None, t: Any) -> Any:
        """Inverse of :meth:`_out`: the shape the sharded parameter has."""
        if name in self.shapes and isinstance(t, torch.Tensor) and key != STEP and t.ndim == 0:
            return t.reshape(1)
        return t

    def _order(self, model: nn.Module, optimizer: Any) -> list[str]:
        """The names of the optimizer's parameters, in torch's numbering (group after group)."""
        names = {p: n for n, p in self._canonical(dict(model.named_parameters())).items()}
        return [names[p] for g in optimizer.param_groups for p in g["params"]]

    # --------------------------------------------------------------------------- states
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full model state dict on the CPU of the main process ({} elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: self._out(k, None, v) for k, v in state.items()}

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """The full optimizer state dict on the CPU of the main process, numbered as torch numbers it
        ({} elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        index: dict[str, int] = {}
        groups = [{**g, "params": [index.setdefault(n, len(index)) for n in g["params"]]}
                  for g in state["param_groups"]]
        per_param = {index[n]: {k: self._out(n, k, v) for k, v in s.items()} for n, s in state["state"].items()}
        return {"state": per_param, "param_groups": groups}

    def load_model(self, model: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
        """Load a full model state dict (on the main process; None elsewhere) into the shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {k: self._in(k, None, v) for k, v in state.items()} if self.is_main and state is not None else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def load_optimizer(self, model: nn.Module, optimizer: Any, state: dict[str, Any] | None) -> None:
        """Load a full optimizer state dict numbered as torch numbers it (on the main process; None
        elsewhere) into the shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full: dict[str, Any] = {}
        if self.is_main and state is not None:
            order = self._order(model, optimizer)
            full = {"state": {order[i]: {k: self._in(order[i], k, v) for k, v in s.items()}
                              for i, s in state["state"].items()},
                    "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The model unsharded, on the CPU of the main process (None elsewhere), for ``final/``."""
        state = self.model_state(model)
        if self.skeleton is None:
            return None
        self.skeleton.load_state_dict(state, strict=True, assign=True)
        return self.skeleton


__all__ = ["Sharded", "plugin", "check_launch", "check_modules", "local", "vectorise_scalars", "meta_copy"]
