"""Time and memory of every method on one model and one calibration set, in one process.

Numbers are reported as ratios measured in the same run (forward-pass equivalents, peak
over plain inference), because absolute times on shared machines are noisy.

On CPU there is no allocator counter like CUDA's, so the peak is the growth of the
process's resident memory, sampled every 2 ms, with glibc told to hand every buffer
of 64 KiB or more straight back to the system when it is freed (otherwise freed tensors
stay resident and every later measurement starts from a high-water mark).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Sequence
from typing import Callable

import torch
from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config

from .allocation import zeroth_order_scores
from .anatomy import INCLUDE_CHOICES, prunable_layers
from .data import batches, calibration_loss, default_calibration, encode, on_model, take
from .models import LoadedModel, build_blip2, build_processor, resolve_device, resolve_dtype
from .pipeline import PruneOptions, preset, prune
from .toy.tokenizer import build_tokenizer
from .weights import WeightStore

# The published BLIP-2 architectures, written out so no config needs downloading.
_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=224, patch_size=14, initializer_range=0.02)
_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                encoder_hidden_size=1408, cross_attention_frequency=2)
ARCHS = {
    "blip2-opt-2.7b": ("opt", dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                                   word_embed_proj_dim=2560, vocab_size=50304, max_position_embeddings=2048)),
    "blip2-flan-t5-xl": ("t5", dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                                    num_heads=32, feed_forward_proj="gated-gelu", vocab_size=32128,
                                    tie_word_embeddings=False)),
}


def random_init_model(arch: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """A full-size BLIP-2 architecture with random weights (no download), for time and memory."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    family, text = ARCHS[arch]
    tokenizer = build_tokenizer(family)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    text_config = OPTConfig(**text, bos_token_id=tokenizer.bos_token_id, **special) if family == "opt" \
        else T5Config(**text, decoder_start_token_id=tokenizer.pad_token_id, **special)
    config = Blip2Config(vision_config=Blip2VisionConfig(**_VIT_G).to_dict(),
                         qformer_config=Blip2QFormerConfig(**_QFORMER).to_dict(),
                         text_config=text_config.to_dict(), num_query_tokens=32,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, family)
    with torch.device(target):
        model = build_blip2(config)
    model.to(dtype=torch_dtype)
    return LoadedModel(model, build_processor(tokenizer, config), f"{arch} (random init)", target, torch_dtype)


def _return_freed_buffers_to_the_system():
    """glibc: a fixed mmap threshold (64 KiB) so large frees unmap at once, then trim the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


class MemoryMeter:
    """Peak memory of a block of work: CUDA max allocated, or on CPU the peak RSS growth."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0
        if not self.cuda:
            _return_freed_buffers_to_the_system()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


class EncodedAtEachPass(Sequence):
    """Calibration batches encoded again every time they are read, as the reference
    code's data loader does for every perturbed pass (the baseline of the bench)."""

    def __init__(self, loaded: LoadedModel, examples: list, batch_size: int):
        self.loaded, self.examples, self.batch_size = loaded, examples, batch_size

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.examples[i * self.batch_size : (i + 1) * self.batch_size]
        encoded = encode(self.loaded.processor, chunk, self.loaded.model.config.use_decoder_only_language_model)
        return on_model(encoded, self.loaded.device, self.loaded.dtype)


def _timed(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(
    loaded: LoadedModel,
    methods: list[str],
    sparsity: float = 0.5,
    calibration=None,
    options: PruneOptions | None = None,
    naive_zeroth: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """{"methods": {name: {stage1_s, stage2_s, total_s, forward_equivalents, peak_bytes, peak_vs_inference}}, ...}."""

    options = options or PruneOptions()
    calibration = calibration if calibration is not None else default_calibration()
    model = loaded.model
    decoder_only = model.config.use_decoder_only_language_model
    store = WeightStore(prunable_layers(model, INCLUDE_CHOICES))
    data = batches(loaded.processor, take(calibration, options.samples, "bench"), options.batch_size,
                   decoder_only, loaded.device, loaded.dtype)

    def forward_all():
        with torch.no_grad():
            for b in data:
                calibration_loss(model, b)

    cpu = loaded.device.type != "cuda"

    def run(name: str):
        method, opts = preset(name, options)
        try:
            return prune(loaded, method, sparsity, opts, calibration, progress)
        finally:
            store.restore()

    def naive_comparison() -> dict:
        if not (naive_zeroth and any(preset(n)[0] == "ecoflap" and preset(n)[1].scores == "zeroth" for n in methods)):
            return {}
        layers = prunable_layers(model, options.include)
        examples = take(calibration, options.stage1_sample_count(), "bench")
        encoded = batches(loaded.processor, examples, options.batch_size, decoder_only, loaded.device, loaded.dtype)
        reference = EncodedAtEachPass(loaded, examples, options.batch_size)
        ways = {
            "replayed": lambda: zeroth_order_scores(model, layers, encoded, options.eps),
            "full": lambda: zeroth_order_scores(model, layers, encoded, options.eps, replay=False),
            "loop": lambda: zeroth_order_scores(model, layers, reference, options.eps, replay=False),
        }
        # Interleaved and best of three, so a slow spell of a shared machine hits all three.
        seconds = {name: [] for name in ways}
        for _ in range(3):
            for name, way in ways.items():
                seconds[name].append(_timed(way, loaded.device))
        replayed, full, loop = (min(seconds[name]) for name in ways)
        return {"zeroth_stage1_replayed_s": round(replayed, 4), "zeroth_stage1_full_forward_s": round(full, 4),
                "zeroth_stage1_reference_loop_s": round(loop, 4),
                "zeroth_stage1_speedup": round(full / replayed, 3),
                "zeroth_stage1_speedup_vs_reference_loop": round(loop / replayed, 3)}

    forward_all()  # warm-up
    forward_s = min(_timed(forward_all, loaded.device) for _ in range(2))
    # On CPU the memory meter changes how glibc hands out memory (and so the times):
    # time everything first, then measure memory in a second pass.
    timed = {name: run(name) for name in methods} if cpu else {}
    extra = naive_comparison() if cpu else {}
    with MemoryMeter(loaded.device) as inference:
        with torch.no_grad():
            for _ in range(5):
                calibration_loss(model, data[0])
    # On CPU the growth leaves out the weights, which CUDA's counter includes: add them
    # to both sides of the ratio so it compares the same thing on both devices.
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) if cpu else 0
    results: dict = {}
    for name in methods:
        with MemoryMeter(loaded.device) as meter:
            result = run(name)
        timings = timed.setdefault(name, result).timings
        results[name] = {
            "stage1_s": round(timings.get("stage1_s", 0.0), 4),
            "stage2_s": round(timings["stage2_s"], 4),
            "total_s": round(timings["total_s"], 4),
            "forward_equivalents": round(timings["total_s"] / forward_s, 3),
            "peak_bytes": meter.peak,
            "peak_vs_inference": round((meter.peak + resident) / (inference.peak + resident), 3)
            if inference.peak + resident > 0 else None,
            "achieved_sparsity": round(result.achieved_sparsity, 6),
        }
    if not cpu:
        extra = naive_comparison()
    first = next(iter(model.parameters()))
    return {
        "model": loaded.name,
        "device": str(first.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "sparsity": sparsity,
        "calibration_samples": options.samples,
        "forward_pass_s": round(forward_s, 4),
        "inference_peak_bytes": inference.peak,
        "weights_bytes_added_to_ratios": resident,
        "peak_kind": "cuda_max_allocated" if loaded.device.type == "cuda" else "cpu_rss_growth",
        "methods": results,
        **extra,
    }
