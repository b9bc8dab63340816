"""Gradient caching (Gao et al., 2021, "GradCache"): the gradients of a whole contrastive batch with
the activation memory of one chunk of it.

A contrastive loss couples every sample of the batch, so the batch cannot simply be split into
accumulation steps (each would see only its own negatives). Instead:

1. embed the batch chunk by chunk **without a graph**, remembering each chunk's random state;
2. take the loss (and its metrics) on the concatenated outputs, and its gradient with respect to
   those outputs (and to the objective's own parameters);
3. run each chunk again **with** a graph, under the same random state (the same dropout and patch
   dropout masks), and back-propagate the cached output gradients through it. The last chunk is not
   run again: its first pass keeps its graph (``keep_last``), one forward pass fewer.

The parameter gradients equal the whole-batch step's (to float round-off) for any model whose
output for a sample does not depend on the other samples of its chunk. BatchNorm in training mode
does (its statistics are per chunk, and running statistics are updated twice per step by every
chunk but the last), so models with BatchNorm train on per-chunk statistics under gradient caching:
close, not equal. It costs the forward passes of all chunks but one again: n chunks of a batch take
(2n - 1)/n forward passes and one backward, against one of each (at n = 4 about 1.25 times a step's
work, counting a backward as two forwards; 1.33 without ``keep_last``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

Nested = Any  # tensors inside dicts, lists and tuples, as batches and model outputs are


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch: the length of its ``key`` list (every mmcl batch has one)."""
    return len(batch["key"])


def split(x: Nested, start: int, end: int, n: int) -> Nested:
    """Samples ``start:end`` of a batch of ``n``: tensors whose first dimension is ``n`` are sliced,
    per-sample lists (length ``n``, no tensors inside) too; containers are split member by member."""
    if isinstance(x, torch.Tensor):
        return x[start:end] if x.dim() and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: split(v, start, end, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if len(x) == n and not any(isinstance(v, (torch.Tensor, list, tuple, dict)) for v in x):
            return x[start:end]
        return type(x)(split(v, start, end, n) for v in x)
    return x


def concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the samples of ``batches`` (the inverse of :func:`split`): per-sample tensors and
    lists joined, containers member by member, anything else taken from the first. Token ids and
    attention masks cut after each batch's longest text (``model.trim_text``) are padded with 0 to
    the longest of them."""
    sizes = [batch_size(b) for b in batches]

    def join(parts: list[Nested]) -> Nested:
        first = parts[0]
        if isinstance(first, torch.Tensor):
            batched = first.dim() and all(p.shape[0] == n for p, n in zip(parts, sizes))
            if batched and first.dim() == 2 and not first.is_floating_point():
                width = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
            return torch.cat(parts) if batched else first
        if isinstance(first, dict):
            return {k: join([p[k] for p in parts]) for k in first}
        if isinstance(first, (list, tuple)):
            if all(len(p) == n for p, n in zip(parts, sizes)) and not any(
                    isinstance(v, (torch.Tensor, list, tuple, dict)) for v in first):
                return type(first)(v for p in parts for v in p)
            return type(first)(join(list(vs)) for vs in zip(*parts))
        return first

    return join(batches)


def _leaves(x: Nested) -> Iterator[torch.Tensor]:
    """The tensors of a nested output, in a fixed order."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from _leaves(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)


def _rebuild(x: Nested, leaves: Iterator[torch.Tensor]) -> Nested:
    """``x`` with its tensors replaced, in :func:`_leaves` order."""
    if isinstance(x, torch.Tensor):
        return next(leaves)
    if isinstance(x, dict):
        new = {k: _rebuild(x[k], leaves) for k in sorted(x)}
        return {k: new[k] for k in x}
    if isinstance(x, (list, tuple)):
        return type(x)(_rebuild(v, leaves) for v in x)
    return x


def _is_batched(t: torch.Tensor, n: int) -> bool:
    return t.dim() > 0 and t.shape[0] == n


class RandomState:
    """The random state forward passes draw from (torch's CPU generator and the device's)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The current state."""
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None

    def set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Restore a state :meth:`get` returned."""
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)


def grad_cache_step(model: Callable[[Any], Nested], objective: Callable[[Nested, Any], tuple[torch.Tensor, dict]],
                    batch: dict[str, Any], chunk: int, *, device: torch.device,
                    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                    no_sync: Callable[[], AbstractContextManager[Any]] = nullcontext,
                    keep_last: bool = True) -> tuple[torch.Tensor, dict]:
    """Forward and backward of ``objective(model(batch), batch)`` in chunks of ``chunk`` samples;
    the gradients accumulate into the parameters' ``.grad`` as one whole-batch backward would.

    ``autocast`` wraps every forward pass; ``backward`` back-propagates the loss (Accelerate's,
    which scales it for fp16 and divides it for gradient accumulation); ``no_sync`` wraps every
    chunk's forward and backward but those of the last chunk re-run (DDP's ``no_sync``: gradients are
    all-reduced once, in that last backward, which also receives the gradients of outputs that are
    not per sample, such as CLIP's ``logit_scale``, so that every parameter takes part in it).

    ``keep_last``: the last chunk is embedded with a graph in the first pass, kept through the loss
    and back-propagated without being run again: one chunk's forward pass fewer per step (n chunks:
    n - 1 forward passes without a graph, not n), for holding that chunk's activations while the loss
    is taken (the step's peak memory is then a chunk's activations plus the loss's, not the larger of
    the two). The random draws, and so the gradients, are the same either way.
    Returns the loss and metrics of the whole batch.

    >>> lin = torch.nn.Linear(3, 2)
    >>> batch = {"x": torch.randn(6, 3), "key": list("abcdef")}
    >>> loss_fn = lambda out, b: ((out["y"] ** 2).mean(), {})
    >>> loss, _ = grad_cache_step(lambda b: {"y": lin(b["x"])}, loss_fn, batch, 4, device=torch.device("cpu"))
    >>> cached = lin.weight.grad.clone(); lin.zero_grad()
    >>> loss_fn({"y": lin(batch["x"])}, batch)[0].backward()
    >>> torch.allclose(cached, lin.weight.grad)
    True
    """
    n = batch_size(batch)
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    kept = len(bounds) - 1 if keep_last else None  # the chunk whose first pass keeps its graph
    rng = RandomState(device)
    states, outputs = [], []
    for k, (start, end) in enumerate(bounds):  # 1. embed every chunk without a graph (but the kept one)
        states.append(rng.get())
        # the kept chunk's backward comes first, so it must not be DDP's synchronising one (unless it is alone)
        with torch.no_grad() if k != kept else no_sync() if len(bounds) > 1 else nullcontext():
            with autocast():
                outputs.append(model(split(batch, start, end, n)))
    chunks = [list(_leaves(o)) for o in outputs]
    kept_leaves = chunks[-1] if kept is not None else []
    cached = []  # one leaf per output tensor of the whole batch, holding the loss's gradient
    with torch.no_grad():
        for i, last in enumerate(chunks[-1]):
            whole = torch.cat([c[i] for c in chunks]) if _is_batched(last, bounds[-1][1] - bounds[-1][0]) else last
            cached.append(whole.detach().requires_grad_(whole.is_floating_point()))
    del chunks
    with autocast():  # 2. the loss on the whole batch, and its gradient with respect to the outputs
        loss, metrics = objective(_rebuild(outputs[-1], iter(cached)), batch)
    del outputs
    backward(loss)
    after_loss = rng.get()  # what the objective drew (shuffles, crops) must not be drawn again
    rerun = [k for k in range(len(bounds)) if k != kept]
    for k in ([kept] if kept is not None else []) + rerun:  # 3. each chunk with its gradient, the kept one first
        start, end = bounds[k]
        synced = k == (rerun[-1] if rerun else kept)  # the last backward: all-reduces, takes unbatched gradients
        with nullcontext() if synced else no_sync():
            if k == kept:
                leaves, kept_leaves = kept_leaves, []  # its activations go with this backward
            else:
                rng.set(states[k])
                with autocast():
                    leaves = list(_leaves(model(split(batch, start, end, n))))
            pairs = []
            for out, leaf in zip(leaves, cached):
                if leaf.grad is None or not out.requires_grad:
                    continue
                if _is_batched(out, end - start):
                    pairs.append((out, leaf.grad[start:end].to(out.dtype)))
                elif synced:
                    pairs.append((out, leaf.grad.to(out.dtype)))
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        del leaves
    rng.set(after_loss)
    return loss, metrics
