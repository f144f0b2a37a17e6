"""Loading a vision-language model (hub id or local folder); models built from a config
with random weights are `synthetic`'s.

The config's model_type picks the family (see `families`), whose transformers class
and processor load the model; no remote code is ever trusted, and only safetensors
weights are opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, PretrainedConfig

from . import families
from .echo import shown
from .families import Family
from .offload import offload_model, resolve_offload

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = str(ASSETS / "shapes-blip2")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    """A vision-language model with its processor; `name` is for display (a hub id, or a
    folder's name), `source` where it was loaded from (never shown to other users)."""

    model: torch.nn.Module
    processor: object
    name: str
    device: torch.device
    dtype: torch.dtype
    source: str | None = None
    offload: str | None = None

    @property
    def family(self) -> str:
        """For display: the family and its language model ('BLIP-2 (OPT)', 'LLaVA (Llama)')."""
        return families.of(self.model).label(self.model.config)

    @property
    def decoder_only(self) -> bool:
        return families.of(self.model).decoder_only(self.model.config)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, family: Family, config) -> torch.dtype:
    """float32 on CPU; on an accelerator the family's half precision (float16 for OPT,
    bfloat16 for T5, the checkpoint's own for the others). float16 is refused where
    the family overflows in it."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        resolved = torch.float32 if device.type == "cpu" else family.gpu_dtype(config)
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    refusal = family.refuses_float16(config)
    if resolved == torch.float16 and refusal:
        raise ModelLoadError(refusal)
    return resolved


def _read_config(name: str) -> tuple[PretrainedConfig, Family, str]:
    """The config, its family and the path or hub id to load from, or one clear error line."""
    local = Path(name).expanduser()
    shown = display_name(name)
    looks_local = name.startswith((".", "/", "~")) or local.exists()
    if name.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"no model folder at {name}")
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{name} is a file, not a model folder")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(f"{name} is a folder without config.json: not a saved model")
    source = str(local) if local.is_dir() else name
    try:
        raw, _ = PretrainedConfig.get_config_dict(source)
    except OSError as err:
        log.info("config of %s: %s", name, err)
        if looks_local:
            raise ModelLoadError(f"cannot read the config.json of {shown}") from err
        raise ModelLoadError(not_on_hub(name)) from err
    except ValueError as err:
        raise ModelLoadError(f"{shown} has an unreadable config.json (not valid JSON)") from err
    try:
        family = families.for_model_type(raw.get("model_type"))
    except families.UnsupportedFamily as err:
        raise ModelLoadError(f"{shown} is {err}") from None
    try:
        return AutoConfig.from_pretrained(source), family, source
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("config of %s: %s", name, err)
        raise ModelLoadError(f"{shown} has a {family.name} config.json that cannot be read") from err


def load_model(
    name: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    device_map: str | None = None,
    offload: str | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a model of a supported family and its processor from a hub id or a local
    `save_pretrained` folder.

    Only safetensors weights are opened (never pickles). `device_map="auto"` spreads a
    model that does not fit one GPU through accelerate. `offload="cpu"` or `"disk"`
    (default: ECOFLAP_OFFLOAD, ECOFLAP_OFFLOAD_FOLDER) is for a model larger than the
    device: its weights stay in CPU memory (or in files under `offload_folder`) and come
    to the device one block at a time (see `offload`).
    """
    name = name or os.environ.get("ECOFLAP_MODEL") or DEFAULT_MODEL
    try:
        offload, offload_folder = resolve_offload(offload, offload_folder)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    if offload and device_map:
        raise ModelLoadError("choose either a device_map or an offload, not both")
    config, family, source = _read_config(name)
    shown = display_name(name)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, family, config)
    try:
        processor = family.load_processor(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        log.info("processor of %s: %s", name, err)
        raise ModelLoadError(f"the tokenizer or image processor of {shown} cannot be read") from err
    kwargs = {"dtype": torch_dtype, "use_safetensors": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = family.model_loader().from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError as err:
        raise ModelLoadError(f"{shown} does not fit in memory on {target}") from err
    except SafetensorError as err:
        log.info("weights of %s: %s", name, err)
        raise ModelLoadError(f"the weights file of {shown} is truncated or corrupt") from err
    except (OSError, ValueError, RuntimeError) as err:
        log.info("weights of %s: %s", name, err)
        raise ModelLoadError(_weights_problem(source, shown, err)) from err
    if offload:
        return offloaded(LoadedModel(model.eval(), processor, shown, target, torch_dtype, source), offload, target,
                         offload_folder)
    if not device_map:
        try:
            model.to(target)
        except torch.OutOfMemoryError as err:
            del model
            raise ModelLoadError(f"{shown} does not fit in memory on {target}") from err
    model.eval()
    first_param = next(model.parameters())
    log.info("loaded %s (%s) on %s (%s)", name, family.name, first_param.device, first_param.dtype)
    return LoadedModel(model, processor, shown, first_param.device, torch_dtype, source)


def offloaded(loaded: LoadedModel, offload: str, device: torch.device, folder: str | None = None) -> LoadedModel:
    """A model loaded on the CPU, offloaded (see `offload`) to run one block at a time on `device`."""
    try:
        offload_model(loaded.model, offload, device, folder)
    except OSError as err:
        log.info("offload of %s: %s", loaded.name, err)
        raise ModelLoadError(f"cannot write the offloaded weights of {loaded.name} to the offload folder") from err
    log.warning("%s: weights offloaded to %s, one block at a time on %s; not available with offload: "
                "first-order ECoFLaP, gradient distributions, recovery", loaded.name, offload, device)
    loaded.device, loaded.offload = device, offload
    return loaded


def _weights_problem(source: str, shown: str, err: Exception) -> str:
    """Why from_pretrained refused the weights, in one line."""
    text = str(err)
    if "mismatched" in text or "size mismatch" in text:
        return f"the weights of {shown} do not fit its config.json (a tensor's shape differs from what the config describes)"
    folder = Path(source)
    pickles = folder.is_dir() and any(folder.glob("*.bin")) or folder.is_dir() and any(folder.glob("*.pt*"))
    if pickles and not any(folder.glob("*.safetensors")):
        return (f"{shown} has only PyTorch pickle weights (.bin); this workbench opens safetensors weights only, "
                f"for safety (convert them with save_pretrained(..., safe_serialization=True))")
    if "safetensors" in text or "no file named" in text:
        return f"{shown} has no safetensors weights (model.safetensors)"
    return f"the weights of {shown} cannot be loaded"


def not_on_hub(name: str) -> str:
    """What a hub id that cannot be loaded gets (the same words whatever the reason)."""
    return (f"cannot load {shown(name, 100)} from the Hugging Face hub: no such model, a gated one, "
            f"or the hub is unreachable from here")


def display_name(name: str) -> str:
    """A hub id as it is; a local folder by its own name, never its path on this machine."""
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or local.exists():
        return local.resolve().name or "model"
    return name
