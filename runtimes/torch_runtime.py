"""The torch reference runtime: transformers on the merged full-precision model."""
from __future__ import annotations

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

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> tuple[np.ndarray, Any]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.tensor([list(ids)], dtype=torch.long)
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=0 if all_logits else 1)
        return out.logits[0].float().numpy(), (out.past_key_values, len(ids))

    def decode(self, state: Any, token: int) -> tuple[np.ndarray, Any]:
        torch = self._torch
        cache, length = state
        with torch.inference_mode():
            x = torch.tensor([[int(token)]], dtype=torch.long)
            out = self.model(input_ids=x, past_key_values=cache, use_cache=True)
        return out.logits[0].float().numpy(), (out.past_key_values, length + 1)

    def artifact_files(self):
        return self.artifact_dir
