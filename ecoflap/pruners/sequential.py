"""Block-by-block calibration without model surgery.

The model always runs through its own `forward`. To feed block b of a stack with the
outputs of block b-1 (as pruned), the blocks before b are temporarily made to return
the cached output of block b-1 (the stack's loop just passes it along), and whole stacks
that are finished are made to return their cached output. A forward hook stops the run
as soon as the part of interest has executed. For pruning, each block therefore runs
about twice (statistics, then its pruned output); ECoFLaP's zeroth-order stage 1 uses
the same walk to start each perturbed forward pass at the perturbed block.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..anatomy import PrunableLayer, Stack, stacks
from ..data import token_mask
from ..forwards import replaced_forward


class _Stop(Exception):
    """Raised by a hook once the part of the forward pass we need has run."""


def _replaying(module: nn.Module, outputs: list, state: dict):
    """Make `module` return outputs[state['batch']] instead of computing."""

    def replay(*args, **kwargs):
        return outputs[state["batch"]]

    return replaced_forward(module, replay)


@contextlib.contextmanager
def _stopping_after(module: nn.Module, sink: list | None):
    """Record the module's output into `sink` (if given), then stop the forward pass."""

    def hook(_module, _args, output):
        if sink is not None:
            sink.append(_detach(output))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _detach(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detach(o) for o in output)
    return output


class InputStatistics:
    """Accumulates what pruning methods need from a layer's inputs over real tokens."""

    def __init__(self, layer: PrunableLayer, want_hessian: bool):
        columns = layer.module.in_features
        device = layer.module.weight.device
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.hessian = (
            torch.zeros(columns, columns, dtype=torch.float32, device=device) if want_hessian else None
        )
        self.tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None):
        if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.to(x.device)]
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq_norm += (x * x).sum(dim=0)
        if self.hessian is not None:
            self.hessian += x.t() @ x
        self.tokens += x.shape[0]


class SequentialRunner:
    """Runs calibration batches through a model, one block at a time, in forward order."""

    def __init__(self, model, batches: list[dict]):
        self.model = model
        self.batches = batches
        self.state = {"batch": 0}
        self.stacks = stacks(model)
        self.finished: dict[str, list] = {}

    @contextlib.contextmanager
    def replayed(self, stack: Stack, upto: int, block_cache: list | None):
        """Finished stacks and the blocks of `stack` before `upto` return cached outputs."""
        with contextlib.ExitStack() as ctx:
            for name, outputs in self.finished.items():
                container = next(s.container for s in self.stacks if s.name == name)
                ctx.enter_context(_replaying(container, outputs, self.state))
            if block_cache is not None:
                for block in stack.blocks[:upto]:
                    ctx.enter_context(_replaying(block, block_cache, self.state))
            yield

    def each_batch(self, stack: Stack, upto: int, block_cache: list | None, fn: Callable[[int, dict], None],
                   stop: nn.Module | None = None, sink: list | None = None):
        """fn(i, batch) for every batch with earlier parts replayed; a forward that reaches
        `stop` ends there (its output appended to `sink`)."""
        with self.replayed(stack, upto, block_cache), contextlib.ExitStack() as ctx:
            if stop is not None:
                ctx.enter_context(_stopping_after(stop, sink))
            for i, batch in enumerate(self.batches):
                self.state["batch"] = i
                try:
                    fn(i, batch)
                except _Stop:
                    continue
                if stop is not None:
                    raise RuntimeError(f"the forward pass never reached {type(stop).__name__}")

    def _forward_until(self, stack: Stack, upto: int, block_cache: list | None, stop: nn.Module, sink: list | None):
        with torch.no_grad():
            self.each_batch(stack, upto, block_cache, lambda i, batch: self.model(**batch), stop, sink)

    def walk(
        self,
        layers: list[PrunableLayer],
        visit: Callable[[Stack, int, list[PrunableLayer], Callable], None],
        progress: Callable[[str, int, int], None] | None = None,
    ):
        """Visit each block holding prunable layers in forward order.

        visit(stack, b, block_layers, run) may change the block's weights; `run(fn, stop)`
        calls fn(i, batch) per batch with everything before block b replayed from the
        cache (so a forward pass starts computing at block b). After the visit the
        block's output, with its weights as the visit left them, becomes the new cache.
        """
        by_block: dict[tuple[str, int], list[PrunableLayer]] = {}
        for layer in layers:
            by_block.setdefault((layer.stack, layer.block), []).append(layer)
        last_stack = max((i for i, s in enumerate(self.stacks) if any(k[0] == s.name for k in by_block)), default=-1)
        total = len(by_block)
        done = 0
        try:
            for si, stack in enumerate(self.stacks[: last_stack + 1]):
                if not any((stack.name, b) in by_block for b in range(len(stack.blocks))):
                    if si < last_stack:
                        outputs: list = []
                        self._forward_until(stack, 0, None, stack.container, outputs)
                        self.finished[stack.name] = outputs
                    continue
                cache: list | None = None
                for b, block in enumerate(stack.blocks):
                    if (stack.name, b) in by_block:
                        visit(stack, b, by_block[(stack.name, b)],
                              lambda fn, stop=None, _b=b, _c=cache, _s=stack: self.each_batch(_s, _b, _c, fn, stop))
                        done += 1
                        if progress:
                            progress(f"{stack.name} block {b}", done, total)
                    last_block = b == len(stack.blocks) - 1
                    if last_block and si < last_stack:
                        outputs = []
                        self._forward_until(stack, b, cache, stack.container, outputs)
                        self.finished[stack.name] = outputs
                    elif not last_block:
                        new_cache: list = []
                        self._forward_until(stack, b, cache, block, new_cache)
                        cache = new_cache
        finally:
            self.finished.clear()

    def run(
        self,
        layers: list[PrunableLayer],
        prune_block: Callable[[list[PrunableLayer], dict], None],
        want_hessian: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ):
        """Sequential pruning: per block, gather input statistics, then prune it.

        `prune_block(layers, stats)` gets the block's layers and an `InputStatistics` per
        layer name, and must prune them in place.
        """

        def visit(stack: Stack, b: int, block_layers: list[PrunableLayer], run):
            stats = {l.name: InputStatistics(l, want_hessian) for l in block_layers}
            current = {"mask": None}
            handles = [
                l.module.register_forward_pre_hook(
                    lambda _m, args, _s=stats[l.name]: _s.add(args[0].detach(), current["mask"])
                )
                for l in block_layers
            ]

            def forward(i, batch):
                current["mask"] = token_mask(batch, stack.name)
                self.model(**batch)

            try:
                with torch.no_grad():
                    run(forward, stop=stack.blocks[b])
            finally:
                for h in handles:
                    h.remove()
            prune_block(block_layers, stats)

        self.walk(layers, visit, progress)
