"""The models a deployment serves: the default one, plus others loaded on request.

A public deployment can restrict what may be loaded (ECOFLAP_ALLOWED_MODELS, a comma-
separated allowlist) and how many models stay in memory (ECOFLAP_MAX_MODELS); the
default model is never unloaded. A model that fails to load leaves everything loaded
before untouched.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from .anatomy import prunable_layers
from .models import DEFAULT_MODEL, load_model
from .workbench import Workbench


class ModelRegistry:
    def __init__(
        self,
        default_name: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        allowlist: list[str] | None = None,
        max_models: int = 2,
        max_runs: int = 8,
        max_run_bytes: int | None = None,
        allow_model_export: bool = True,
    ):
        self.default_name = default_name
        self.device = device
        self.dtype = dtype
        self.allowlist = allowlist
        self.max_models = max(1, max_models)
        self.max_runs = max_runs
        self.max_run_bytes = max_run_bytes
        self.allow_model_export = allow_model_export
        self.benches: OrderedDict[str, Workbench] = OrderedDict()
        self.lock = threading.Lock()
        self.get(default_name)

    @classmethod
    def from_environment(cls, model: str | None = None, device: str = "auto", dtype: str = "auto") -> "ModelRegistry":
        allow = os.environ.get("ECOFLAP_ALLOWED_MODELS")
        megabytes = os.environ.get("ECOFLAP_MAX_RUN_MB")
        return cls(
            default_name=model or DEFAULT_MODEL,
            device=device,
            dtype=dtype,
            allowlist=[m.strip() for m in allow.split(",") if m.strip()] if allow else None,
            max_models=int(os.environ.get("ECOFLAP_MAX_MODELS", "2")),
            max_runs=int(os.environ.get("ECOFLAP_MAX_RUNS", "8")),
            max_run_bytes=int(float(megabytes) * 2**20) if megabytes else None,
            allow_model_export=os.environ.get("ECOFLAP_ALLOW_MODEL_EXPORT", "1") != "0",
        )

    def check_allowed(self, name: str):
        if name != self.default_name and self.allowlist is not None and name not in self.allowlist:
            raise PermissionError(
                f"this deployment serves only these models: {', '.join([self.default_name] + self.allowlist)}"
            )

    def get(self, name: str, load: bool = True) -> Workbench:
        """The workbench of a model, loading it if needed (LRU beyond max_models)."""
        with self.lock:
            bench = self.benches.get(name)
            if bench is not None:
                self.benches.move_to_end(name)
                return bench
            if not load:
                raise KeyError(name)
            self.check_allowed(name)
            loaded = load_model(name, device=self.device, dtype=self.dtype)
            bench = Workbench(loaded, max_runs=self.max_runs, max_bytes=self.max_run_bytes)
            self.benches[name] = bench
            while len(self.benches) > self.max_models:
                oldest = next(n for n in self.benches if n != self.default_name)
                del self.benches[oldest]
            return bench

    def qformer_count(self, name: str) -> int:
        bench = self.get(name)
        return sum(l.numel for l in prunable_layers(bench.loaded.model, ("qformer", "projection")))
