"""Sequential onloading: pruning a model whose weights do not fit on the device.

accelerate's CPU and disk offload keep every weight in a `weights_map` (CPU tensors, or
files in an offload folder); a module's own parameters are empty placeholders on the
meta device, and a hook copies them to the execution device for each forward call and
drops them after it. That is enough to run the model, not to prune it: the weights a
method reads and writes must be the ones in the `weights_map`.

So here: `onloaded(block)` brings one block's weights to the execution device and keeps
them there (the hooks stop reloading them) while the block is calibrated and pruned, then
writes every weight that changed back into the `weights_map` and drops them again; at
most one block is on the device at a time. `read_weight` / `write_weight` reach the
weight the next forward pass really reads, wherever it lives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref

import torch
from torch import nn

from .anatomy import stacks

OFFLOADS = ("cpu", "disk")
OFFLOAD_ENV, OFFLOAD_FOLDER_ENV = "ECOFLAP_OFFLOAD", "ECOFLAP_OFFLOAD_FOLDER"


def _offload_hook(module: nn.Module):
    """The accelerate hook that offloads this module's own weights, or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if h is not None and (getattr(h, "offload", False) or getattr(h, "_ecoflap_onloaded", False)):
            return h
    return None


def is_offloaded(model: nn.Module) -> bool:
    return any(_offload_hook(m) is not None for m in model.modules())


def _module_tensors(module: nn.Module, hook) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                      recurse=hook.place_submodules, remove_non_persistent=True)]


def read_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module's next forward call uses: its parameter, or, while offloaded,
    the value in accelerate's weights_map (for disk offload, a fresh copy read from disk)."""
    hook = _offload_hook(module)
    if hook is None or module.weight.device.type != "meta":
        return module.weight.data
    return hook.weights_map["weight"]


@torch.no_grad()
def write_weight(module: nn.Module, value: torch.Tensor):
    """Make `value` the weight the module's forward calls use, in place where it lives."""
    hook = _offload_hook(module)
    if hook is None or module.weight.device.type != "meta":
        module.weight.data.copy_(value)
        return
    _store(hook.weights_map, "weight", value.to(module.weight.dtype))


def _store(weights_map, key: str, value: torch.Tensor):
    """Write into accelerate's weights_map: in place into a CPU tensor; into the offload
    folder's file for a weight on disk (a checkpoint's own file is never written: the
    index then points to a file of the offload folder)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        if key in weights_map.state_dict:
            weights_map.state_dict[key].copy_(value)
            return
        offload_weight(value.detach().cpu(), key, weights_map.save_folder, index=weights_map.index)
        return
    weights_map[key].copy_(value)


@contextlib.contextmanager
def onloaded(root: nn.Module):
    """Within the block, every offloaded weight under `root` sits on the execution device
    and forward calls use it there; afterwards the linear layers' weights (what pruning
    changes) are written back to the weights_map and the device copies are dropped. A
    model without offload: nothing to do."""
    from accelerate.utils import set_module_tensor_to_device

    held = []
    try:
        for module in root.modules():
            hook = _offload_hook(module)
            if hook is None or not hook.offload:
                continue
            names = _module_tensors(module, hook)
            for name in names:
                set_module_tensor_to_device(module, name, hook.execution_device, value=hook.weights_map[name])
            hook.offload, hook._ecoflap_onloaded = False, True
            held.append((module, hook, names))
        yield
    finally:
        with torch.no_grad():
            for module, hook, names in held:
                if isinstance(module, nn.Linear):
                    _store(hook.weights_map, "weight", module.weight.data)
                for name in names:
                    set_module_tensor_to_device(module, name, "meta")
                hook.offload, hook._ecoflap_onloaded = True, False


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every offloaded tensor read from its weights_map (on
    the CPU; for disk offload this reads the whole model into memory), for saving."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        hook = _offload_hook(module)
        if hook is None or not hook.offload:
            continue
        for name in _module_tensors(module, hook):
            key = f"{prefix}.{name}" if prefix else name
            if key in state and state[key].device.type == "meta":
                state[key] = hook.weights_map[name].to("cpu")
    return state


def resolve_offload(offload: str | None, folder: str | None) -> tuple[str | None, str | None]:
    """The offload choice and folder: the arguments, else the deployment's environment."""
    offload = offload if offload is not None else (os.environ.get(OFFLOAD_ENV) or None)
    folder = folder if folder is not None else (os.environ.get(OFFLOAD_FOLDER_ENV) or None)
    if offload in ("", "none"):
        offload = None
    if offload is not None and offload not in OFFLOADS:
        raise ValueError(f"unknown offload {offload!r}: use cpu or disk")
    if offload == "disk" and not folder:
        raise ValueError(f"disk offload needs a folder for the weights (--offload-folder, or {OFFLOAD_FOLDER_ENV})")
    return offload, folder


def offload_model(model: nn.Module, offload: str, device: torch.device, folder: str | None = None) -> nn.Module:
    """Offload the blocks of a model loaded on the CPU, executing on `device`.

    The transformer blocks (where nearly all weights are) get accelerate's offload hooks
    over a weights_map: the CPU tensors themselves, or files written to a fresh folder
    inside `folder` (removed when the model is garbage collected, so a folder left by
    another model is never read). Everything else (embeddings, norms, heads, BLIP-2's
    query tokens, which the model reads outside any forward call) goes to the device.
    """
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader, offload_state_dict, set_module_tensor_to_device
    names = {module: name for name, module in model.named_modules()}
    blocks = [names[block] for stack in stacks(model) for block in stack.blocks]
    inside = tuple(f"{name}." for name in blocks)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(inside):
            set_module_tensor_to_device(model, name, device)
    weights = {k: v for k, v in model.state_dict().items() if k.startswith(inside)}
    if offload == "disk":
        os.makedirs(folder, exist_ok=True)
        own = tempfile.mkdtemp(prefix="ecoflap-offload-", dir=folder)
        weakref.finalize(model, shutil.rmtree, own, True)
        offload_state_dict(own, weights)
        weights = OffloadedWeightsLoader(save_folder=own)
    for name in blocks:
        attach_align_device_hook(model.get_submodule(name), execution_device=device, offload=True,
                                 weights_map=weights, module_name=name)
    return model
