"""Loading BLIP-2 (hub id or local folder) and building one from a config.

Everything goes through transformers' `Blip2ForConditionalGeneration` and
`Blip2Processor`; no remote code is ever trusted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
    T5Config,
)

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = str(ASSETS / "shapes-blip2")
IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    """A BLIP-2 with its processor; `name` is for display (a hub id, or a folder's name),
    `source` where it was loaded from (never shown to other users)."""

    model: Blip2ForConditionalGeneration
    processor: Blip2Processor
    name: str
    device: torch.device
    dtype: torch.dtype
    source: str | None = None

    @property
    def family(self) -> str:
        """'opt' for decoder-only language models, 't5' for encoder-decoder ones."""
        return "opt" if self.decoder_only else "t5"

    @property
    def decoder_only(self) -> bool:
        return self.model.config.use_decoder_only_language_model


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, family: str) -> torch.dtype:
    """float16 on a GPU for OPT, bfloat16 for T5 (which overflows in float16), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        if device.type == "cpu":
            resolved = torch.float32
        else:
            resolved = torch.bfloat16 if family == "t5" else torch.float16
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if resolved == torch.float16 and family == "t5":
        raise ModelLoadError("FlanT5 overflows in float16: use --dtype bfloat16 or float32")
    return resolved


def _read_config(name: str) -> tuple[Blip2Config, str]:
    """The BLIP-2 config and the path or hub id to load from, or one clear error line."""
    local = Path(name).expanduser()
    shown = display_name(name)
    looks_local = name.startswith((".", "/", "~")) or local.exists()
    if name.startswith((".", "/", "~")) and not local.exists():
        raise ModelLoadError(f"no model folder at {name}")
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{name} is a file, not a model folder")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(f"{name} is a folder without config.json: not a saved BLIP-2 model")
    source = str(local) if local.is_dir() else name
    try:
        raw, _ = Blip2Config.get_config_dict(source)
    except OSError as err:
        log.info("config of %s: %s", name, err)
        if looks_local:
            raise ModelLoadError(f"cannot read the config.json of {shown}") from err
        raise ModelLoadError(
            f"cannot load {name!r} from the Hugging Face hub: no such model, a gated one, "
            f"or the hub is unreachable from here"
        ) from err
    except ValueError as err:
        raise ModelLoadError(f"{shown} has an unreadable config.json (not valid JSON)") from err
    if raw.get("model_type") != "blip-2":
        kind = raw.get("model_type", "unknown")
        kind = kind if isinstance(kind, str) and len(kind) <= 40 else "unknown"
        raise ModelLoadError(f"{shown} is a {kind!r} model, not BLIP-2")
    try:
        return Blip2Config.from_pretrained(source), source
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("config of %s: %s", name, err)
        raise ModelLoadError(f"{shown} has a BLIP-2 config.json that cannot be read") from err


def load_model(
    name: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a BLIP-2 and its processor from a hub id or a local `save_pretrained` folder.

    Only safetensors weights are opened (never pickles). `device_map="auto"` spreads a
    model that does not fit one GPU through accelerate.
    """
    name = name or os.environ.get("ECOFLAP_MODEL") or DEFAULT_MODEL
    config, source = _read_config(name)
    shown = display_name(name)
    family = "opt" if config.use_decoder_only_language_model else "t5"
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, family)
    try:
        processor = load_processor(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.info("processor of %s: %s", name, err)
        raise ModelLoadError(f"the tokenizer or image processor of {shown} cannot be read") from err
    kwargs = {"dtype": torch_dtype, "use_safetensors": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = Blip2ForConditionalGeneration.from_pretrained(source, **kwargs)
    except torch.OutOfMemoryError as err:
        raise ModelLoadError(f"{shown} does not fit in memory on {target}") from err
    except SafetensorError as err:
        log.info("weights of %s: %s", name, err)
        raise ModelLoadError(f"the weights file of {shown} is truncated or corrupt") from err
    except (OSError, ValueError, RuntimeError) as err:
        log.info("weights of %s: %s", name, err)
        raise ModelLoadError(_weights_problem(source, shown, err)) from err
    if not device_map:
        try:
            model.to(target)
        except torch.OutOfMemoryError as err:
            del model
            raise ModelLoadError(f"{shown} does not fit in memory on {target}") from err
    model.eval()
    first_param = next(model.parameters())
    log.info("loaded %s on %s (%s)", name, first_param.device, first_param.dtype)
    return LoadedModel(model, processor, shown, first_param.device, torch_dtype, source)


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


def display_name(name: str) -> str:
    """A hub id as it is; a local folder by its own name, never its path on this machine."""
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or local.exists():
        return local.resolve().name or "model"
    return name


def load_processor(name: str) -> Blip2Processor:
    """The model's processor, with the PIL image backend: no torchvision is needed."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = BlipImageProcessorPil.from_pretrained(name)
    config = Blip2Config.from_pretrained(name)
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)


def blip2_config(tokenizer, family: str, vision: dict, qformer: dict, text: dict, num_query_tokens: int) -> Blip2Config:
    """A BLIP-2 config from the sizes of its three parts, with an OPT or a T5 language
    model whose special tokens and image token come from `tokenizer`."""
    if family == "opt":
        text_config = OPTConfig(**text, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    elif family == "t5":
        text_config = T5Config(**text, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               decoder_start_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"unknown language model family {family!r}: use 'opt' or 't5'")
    return Blip2Config(
        vision_config=Blip2VisionConfig(**vision).to_dict(),
        qformer_config=Blip2QFormerConfig(**qformer).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )


def small_blip2_config(
    tokenizer,
    family: str = "opt",
    hidden: int = 32,
    vision_layers: int = 2,
    qformer_layers: int = 1,
    language_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    num_query_tokens: int = 4,
    heads: int = 2,
) -> Blip2Config:
    """A small BLIP-2 config (OPT or T5 language model) whose vocabulary fits `tokenizer`.

    Every Q-Former layer cross-attends to the image (BLIP-2's default is every second
    one, which leaves a 1- or 2-layer Q-Former nearly blind).
    """
    vocab = len(tokenizer)
    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size, initializer_range=0.02)
    qformer = dict(hidden_size=hidden, num_hidden_layers=qformer_layers, num_attention_heads=heads,
                   intermediate_size=4 * hidden, encoder_hidden_size=hidden, vocab_size=vocab,
                   cross_attention_frequency=1)
    if family == "opt":
        text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=language_layers, ffn_dim=4 * hidden,
                    num_attention_heads=heads, max_position_embeddings=128, word_embed_proj_dim=hidden)
    else:
        text = dict(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=4 * hidden,
                    num_layers=language_layers, num_decoder_layers=language_layers, num_heads=heads,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return blip2_config(tokenizer, family, vision, qformer, text, num_query_tokens)


# The published BLIP-2 architectures, written out so no config needs downloading.
_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=224, patch_size=14, initializer_range=0.02)
_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                encoder_hidden_size=1408, cross_attention_frequency=2)
ARCHITECTURES = {
    "blip2-opt-2.7b": ("opt", dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                                   word_embed_proj_dim=2560, vocab_size=50304, max_position_embeddings=2048)),
    "blip2-flan-t5-xl": ("t5", dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                                    num_heads=32, feed_forward_proj="gated-gelu", vocab_size=32128,
                                    tie_word_embeddings=False)),
}


def random_model(arch: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """A full-size published architecture with random weights (no download), for time and memory."""
    from .shapes.tokenizer import build_tokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    family, text = ARCHITECTURES[arch]
    tokenizer = build_tokenizer(family)
    config = blip2_config(tokenizer, family, _VIT_G, _QFORMER, text, num_query_tokens=32)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, family)
    with torch.device(target):
        model = build_blip2(config)
    model.to(dtype=torch_dtype)
    return LoadedModel(model, build_processor(tokenizer, config), f"{arch} (random init)", target, torch_dtype)


def build_blip2(config: Blip2Config, seed: int = 0) -> Blip2ForConditionalGeneration:
    """A randomly initialised BLIP-2 that is not degenerate.

    transformers' defaults start the ViT at ~zero (initializer_range 1e-10) and the
    query tokens at exactly zero; either one keeps the vision path from ever learning.
    """
    config.vision_config.initializer_range = max(config.vision_config.initializer_range, 0.02)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    return model.eval()


def build_processor(tokenizer, config: Blip2Config) -> Blip2Processor:
    """A processor for a model built from a config (image size from the vision config)."""
    size = config.vision_config.image_size
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)
