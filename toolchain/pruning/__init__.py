"""Pruning algorithms on in-memory Hugging Face causal LMs (layer 5, beside ``toolchain.training``).

``families`` (the architectures known, where their modules and config keys are), ``calibration``
(one pass over the calibration sample: per-column input energy, per-block angular distance),
``scores`` (magnitude and Wanda per weight; per MLP channel, per GQA group, per layer),
``structured`` (layers, MLP channels, GQA groups: a standard checkpoint with the same shape in every
layer), ``sparse`` (unstructured and N:M masks, kept and re-applied after merges, measured sparsity)
and ``prune`` (the structured steps in one call). Nothing here imports a stage or the pipeline; the
prune stage (``toolchain/stages/prune.py``) calls these functions.
"""
