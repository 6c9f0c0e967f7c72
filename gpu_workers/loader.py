"""Finding a checkpoint, reading its config, building our model and streaming weights into it.

Nothing here downloads: a model is a local directory or a repo id already in the local HF cache.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator

import torch
from torch import nn

from gpu_workers.attention.base import AttentionBackend
from gpu_workers.models import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


def resolve_model_path(model: str) -> str:
    """A local directory holding config.json, or the local HF-cache snapshot of repo id `model`."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"model directory {model!r} has no config.json")
        return model
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(model, local_files_only=True)
    except Exception as exc:  # not cached, or not even a valid repo id
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor a repo id in the local Hugging Face cache "
            f"({type(exc).__name__}); downloads are never attempted"
        ) from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"cached snapshot of {model!r} at {path!r} has no config.json")
    return path


def load_hf_config(path: str):
    """The transformers PretrainedConfig of a checkpoint directory (only the config: we never use HF modeling)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def safetensors_files(model_path: str) -> list[str]:
    """The checkpoint's *.safetensors files; the index decides when present (some repos also ship a
    consolidated copy in another naming scheme next to the HF shards)."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, n) for n in names]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {model_path!r} (only safetensors checkpoints are supported; "
            f"use load_format='dummy' for random weights)"
        )
    return files


class SafetensorsSlice:
    """A checkpoint tensor not read yet: the file is memory-mapped and `narrow` reads only the rows
    or columns asked for, so a tensor-parallel rank never materializes the parts other ranks own.
    Quacks like the torch.Tensor methods weight loaders use (`shape`, `narrow`)."""

    def __init__(self, name: str, view, dtype: torch.dtype) -> None:
        self.name = name
        self._view = view  # safetensors PySafeSlice, valid while its file is open
        self._dtype = dtype
        self.shape = torch.Size(view.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, start + length), floating values cast to the model dtype."""
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"{self.name}: [{start}, {start + length}) is outside dim {dim} of {tuple(self.shape)}")
        index = (slice(None),) * dim + (slice(start, start + length),)
        tensor = self._view[index]
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor


def iterate_safetensors(files: list[str], dtype: torch.dtype) -> Iterator[tuple[str, SafetensorsSlice]]:
    """(name, lazy slice) one at a time; the consumer reads what it needs before asking for the
    next, so peak host memory is one rank's slice of one tensor, not the checkpoint."""
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, SafetensorsSlice(name, f.get_slice(name), dtype)


def load_model(
    model_path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_backend: AttentionBackend,
    load_format: str = "auto",
) -> nn.Module:
    """Builds our implementation of the checkpoint's architecture on `device` in `dtype` and fills
    its weights from the safetensors files ("auto"/"safetensors") or with random values ("dummy",
    needs only config.json)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; choose one of {LOAD_FORMATS}")
    hf_config = load_hf_config(model_path)
    model_cls = get_model_class(hf_config)
    files = [] if load_format == "dummy" else safetensors_files(model_path)  # fail before allocating
    model = build_model(model_cls, hf_config, dtype, torch.device(device), attn_backend)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        loaded = model.load_weights(iterate_safetensors(files, dtype))
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            raise ValueError(f"checkpoint {model_path!r} lacks weights for: {missing[:8]}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    logger.info("loaded %s (%s) on %s as %s", model_cls.__name__, load_format, device, dtype)
    return model.eval()


def build_model(model_cls, hf_config, dtype: torch.dtype, device: torch.device, attn_backend) -> nn.Module:
    """Allocates parameters directly on `device` in `dtype` (no CPU copy, no random init)."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = model_cls(hf_config, attn_backend)
    finally:
        torch.set_default_dtype(old_dtype)
    return model


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Small normal weights, norm scales at 1, biases at 0; seeded so every rank draws the same."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            # One seed per parameter: distinct layers, yet independent of which device draws them.
            gen = torch.Generator(device=param.device).manual_seed(seed + i)
            param.normal_(0.0, std, generator=gen)
