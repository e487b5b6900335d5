"""pruning_lab: a small, readable toolkit behind the pruning workbook.

One file per concept:

- ``data``      Fashion-MNIST (or the digits fallback) as tensors, a real text corpus.
- ``models``    LeNet-300-100, the LTH conv nets, ``load_llm`` for the embedded SmolLM2.
- ``train``     a tensor-only training loop (no DataLoader) with a per-step hook for masks.
- ``eval``      accuracy, perplexity, tokens/s, bytes.
- ``workbook``  results JSON, figures, and rerunning notebooks with papermill.
- ``params``    parameter values (one rule for -p and YAML) and the ranges each notebook declares, checked before a run.
- ``sweep``     many papermill runs of one notebook on Dask, each run identified by its content.
- ``__main__``  the command line, ``python -m pruning_lab ...`` (on top: nothing imports it).
- ``masks``     the one mask vocabulary (name -> bool tensor, True = kept): select, apply, keep, mask for a block.
- ``magnitude`` global / layer-wise / ERK / gradual magnitude pruning (chapter 01).
- ``lottery``   iterative magnitude pruning with rewinding, resumable runs (chapter 02).
- ``llama``     the Llama decoder layout: read it, slice a projection, resize a layer, save/reload uneven widths.
- ``lora``      LoRA adapters added and merged (chapter 03's recovery, chapter 05's reasoner and students).
- ``structured`` which heads, MLP channels and layers go (calibration, metrics, plans), and the sliced copy (chapter 03).
- ``needle``    a retrieval task on real text: a made-up fact at a chosen depth of a long passage (chapter 04).
- ``kv_eviction`` StreamingLLM, H2O, TOVA, SnapKV, LazyEviction over one evicting KV cache (chapter 04).
- ``reasoner``  chapter 05's problems, trace writer, LoRA fine-tuning and the cached, seeded reasoner runs.
- ``cot``       chain-of-thought step scores (ASAP's first-token surprisal and rivals), pruning, students, parallel traces (chapter 05).
- ``stats``     the paired tests (Student t, exact McNemar), mean and std, and the one place a verdict becomes words.
- ``structured_results``, ``explore``, ``book``  chapter 03's recorded comparisons, notebook widgets, the web edition.

``default_device()`` below is the one device rule (CUDA when present): every module that picks a device asks it.
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
