"""The torch reference runtime: transformers on the merged full-precision model."""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np

from runtimes.base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.threads)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(self.artifact_dir, dtype=torch.float32).eval()
        # transformers >= 5.2x names the KV cache `cache`; earlier 5.x releases `past_key_values`
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, Any]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([list(ids)], dtype=torch.long)
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=0 if all_logits else 1)
        return out.logits[0].float().numpy(), (self._cache_of(out), len(ids))

    def decode(self, state: Any, token: int) -> tuple[np.ndarray, Any]:
        torch = self._torch
        cache, length = state
        with torch.inference_mode():
            x = torch.tensor([[int(token)]], dtype=torch.long)
            out = self.model(input_ids=x, use_cache=True, **{self._cache_arg: cache})
        return out.logits[0].float().numpy(), (self._cache_of(out), length + 1)

    def _cache_of(self, out):
        return getattr(out, self._cache_arg)

    def artifact_files(self):
        return self.artifact_dir
