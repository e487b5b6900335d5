"""Data the workbook runs on, all as in-memory tensors.

Images: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), else a download of the same IDX files when online,
else scikit-learn's bundled 8x8 digits (stated loudly, resized to 28x28 so every model fits).

Text: the reStructuredText sources of the Python 3.11 documentation from the Debian package
``python3.11-doc`` (PSF licence). The *tutorial* chapter is held out for perplexity; every other
document is calibration text. The split is by file, so the two never overlap.
"""

from __future__ import annotations

import gzip
import os
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_path

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
HELDOUT_SECTIONS = ("tutorial",)


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST is looked for first: ``$PRUNING_LAB_FASHION_MNIST`` or Debian's folder (read at call time)."""
    return Path(os.environ.get("PRUNING_LAB_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def python_docs_dir() -> Path:
    """The Python docs' reST sources: ``$PRUNING_LAB_PYTHON_DOCS`` or Debian's folder (read at call time)."""
    return Path(os.environ.get("PRUNING_LAB_PYTHON_DOCS", "/usr/share/doc/python3.11/html/_sources"))


def cache_dir(*parts: str) -> Path:
    """The user cache folder of pruning_lab (``$PRUNING_LAB_CACHE`` or ``~/.cache/pruning_lab``)."""
    root = Path(os.environ.get("PRUNING_LAB_CACHE", Path.home() / ".cache" / "pruning_lab"))
    return root.joinpath(*parts)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageData:
    """A classification data set as tensors: images ``(N, 1, 28, 28)`` float32, labels int64."""

    name: str
    source: str
    classes: tuple[str, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __repr__(self) -> str:
        val = 0 if self.x_val is None else len(self.x_val)
        return (f"ImageData({self.name!r}: train {len(self.x_train)}, val {val}, "
                f"test {len(self.x_test)}, classes {len(self.classes)}, from {self.source})")

    def to(self, device: torch.device | str) -> "ImageData":
        moved = {k: (getattr(self, k).to(device) if getattr(self, k) is not None else None)
                 for k in ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")}
        return replace(self, **moved)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one (optionally gzipped) IDX file into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number); re-download it.")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}.")
    return data.reshape(*dims)


def _find_fashion_mnist(root: Path | None) -> Path | None:
    candidates = [root] if root is not None else [fashion_mnist_dir(), cache_dir("data", "fashion-mnist")]
    for d in candidates:
        if d is not None and all((Path(d) / f).is_file() for f in FASHION_MNIST_FILES.values()):
            return Path(d)
    return None


def _download_fashion_mnist(timeout: float = 10.0) -> Path | None:
    target = cache_dir("data", "fashion-mnist")
    try:
        for fname in FASHION_MNIST_FILES.values():
            if (target / fname).is_file():
                continue
            with urllib.request.urlopen(FASHION_MNIST_URL + fname, timeout=timeout) as r:
                payload = r.read()
            with atomic_path(target / fname) as tmp:
                tmp.write_bytes(payload)
    except OSError:
        return None
    return target


def _arrays_to_data(name, source, classes, xtr, ytr, xte, yte) -> ImageData:
    xtr = torch.from_numpy(np.require(xtr, requirements=["C", "W"])).float().div_(255.0)
    xte = torch.from_numpy(np.require(xte, requirements=["C", "W"])).float().div_(255.0)
    mean, std = xtr.mean(), xtr.std()  # normalise with training statistics only
    return ImageData(
        name=name, source=source, classes=tuple(classes),
        x_train=((xtr - mean) / std).unsqueeze(1), y_train=torch.from_numpy(ytr.astype(np.int64)),
        x_test=((xte - mean) / std).unsqueeze(1), y_test=torch.from_numpy(yte.astype(np.int64)),
    )


def load_fashion_mnist(root: str | os.PathLike | None = None, *, download: bool = True) -> ImageData:
    """Fashion-MNIST as tensors; raises ``FileNotFoundError`` with the fix when it is not found."""
    root = Path(root) if root is not None else None
    folder = _find_fashion_mnist(root)
    if folder is None and download and root is None:
        folder = _download_fashion_mnist()
    if folder is None:
        where = root or fashion_mnist_dir()
        raise FileNotFoundError(
            f"Fashion-MNIST was not found in {where}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or put the four *-ubyte.gz files there "
            "(or in the folder named by PRUNING_LAB_FASHION_MNIST)."
        )
    cached = cache_dir("data", "fashion-mnist.npz")
    arrays = None
    if cached.is_file() and root is None:
        try:
            with np.load(cached, allow_pickle=False) as z:
                arrays = {k: z[k] for k in FASHION_MNIST_FILES}
        except (OSError, ValueError, KeyError):
            arrays = None  # a corrupt cache is simply rebuilt
    if arrays is None:
        arrays = {k: read_idx(folder / f) for k, f in FASHION_MNIST_FILES.items()}
        if root is None:
            try:
                with atomic_path(cached) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, **arrays)
            except OSError:
                pass  # the cache is an optimisation only
    return _arrays_to_data("fashion-mnist", str(folder), FASHION_MNIST_CLASSES,
                           arrays["train_images"], arrays["train_labels"],
                           arrays["test_images"], arrays["test_labels"])


def load_digits_fallback(seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled to 28x28, 20% held out as test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x * (255.0 / 16.0)).clamp_(0, 255).squeeze(1).numpy()
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return _arrays_to_data("digits", "sklearn.datasets.load_digits", [str(i) for i in range(10)],
                           x[tr], d.target[tr], x[te], d.target[te])


def load_image_data(name: str = "fashion-mnist", *, val_size: int = 5000, seed: int = 0,
                    root: str | os.PathLike | None = None, fallback: bool = True) -> ImageData:
    """The image data every small-net chapter uses, with a validation split carved from train.

    ``name`` is ``"fashion-mnist"`` (default), ``"mnist"`` (IDX files in ``root``) or ``"digits"``.
    When Fashion-MNIST is missing and ``fallback`` is true, warns once and uses the digits.
    The validation split comes from the training set only; the test set is never touched.
    """
    if name == "fashion-mnist":
        try:
            data = load_fashion_mnist(root)
        except FileNotFoundError as e:
            if not fallback:
                raise
            warnings.warn(f"{e} Falling back to scikit-learn's 8x8 digits, so numbers will differ "
                          "from the committed run.", stacklevel=2)
            data = load_digits_fallback(seed)
    elif name == "mnist":
        if root is None:
            raise ValueError("MNIST is not shipped here: pass root= a folder with the four MNIST IDX files.")
        folder = Path(root)
        names = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                 "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
        arrays = {}
        for k, f in names.items():
            hits = [p for p in (folder / f, folder / (f + ".gz")) if p.is_file()]
            if not hits:
                raise FileNotFoundError(f"{folder / f}[.gz] is missing; put the MNIST IDX files in {folder}.")
            arrays[k] = read_idx(hits[0])
        data = _arrays_to_data("mnist", str(folder), [str(i) for i in range(10)], arrays["train_images"],
                               arrays["train_labels"], arrays["test_images"], arrays["test_labels"])
    elif name == "digits":
        data = load_digits_fallback(seed)
    else:
        raise ValueError(f"Unknown image data set {name!r}: use 'fashion-mnist', 'mnist' or 'digits'.")
    if data.name == "digits":
        val_size = min(val_size, len(data.x_train) // 5)
    if val_size:
        if not 0 < val_size < len(data.x_train):
            raise ValueError(f"val_size={val_size} must be between 1 and {len(data.x_train) - 1}.")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(data.x_train), generator=g)
        v, t = perm[:val_size], perm[val_size:]
        data = replace(data, x_val=data.x_train[v], y_val=data.y_train[v],
                       x_train=data.x_train[t], y_train=data.y_train[t])
    return data


# --------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextCorpus:
    """Calibration and held-out text that never overlap (split by document)."""

    name: str
    source: str
    licence: str
    calibration: str
    heldout: str
    calibration_docs: tuple[str, ...] = ()
    heldout_docs: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (f"TextCorpus({self.name!r}: calibration {len(self.calibration):,} chars in "
                f"{len(self.calibration_docs)} docs, held-out {len(self.heldout):,} chars in "
                f"{len(self.heldout_docs)} docs)")


def python_docs_corpus(root: str | os.PathLike | None = None) -> TextCorpus:
    """The Python 3.11 documentation's reST sources (Debian ``python3.11-doc``, PSF licence).

    Held out: every document under ``tutorial/`` (plain explanatory English with some code).
    Calibration: every other document (library reference, how-tos, FAQ, language reference...).
    """
    root = Path(root) if root is not None else python_docs_dir()
    files = sorted(root.rglob("*.rst.txt")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"No Python documentation sources in {root}. Install them with "
            "`sudo apt-get install python3.11-doc`, or use load_text() with your own text file."
        )
    held, cal = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        (held if rel.split("/")[0] in HELDOUT_SECTIONS else cal).append((rel, f.read_text(errors="replace")))
    if not held or not cal:
        raise FileNotFoundError(f"{root} lacks the tutorial/ or the other sections; reinstall python3.11-doc.")
    return TextCorpus(
        name="python-3.11-docs", source=str(root), licence="PSF License Agreement (Python documentation)",
        calibration="\n\n".join(t for _, t in cal), heldout="\n\n".join(t for _, t in held),
        calibration_docs=tuple(r for r, _ in cal), heldout_docs=tuple(r for r, _ in held),
    )


def load_text(source: str | os.PathLike, *, heldout_fraction: float = 0.1,
              split: str = "train", text_field: str = "text") -> TextCorpus:
    """A user's own corpus: a local text file, or (online) a Hugging Face data set ``"name[:config]"``.

    A text file is split by paragraph blocks: the last ``heldout_fraction`` of the file is held out.
    A Hugging Face data set uses its ``split`` for calibration and ``test`` for held-out text.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1).")
    path = Path(source)
    if path.is_file():
        text = path.read_text(errors="replace")
        cut = int(len(text) * (1 - heldout_fraction))
        cut = text.rfind("\n\n", 0, cut) if text.rfind("\n\n", 0, cut) > 0 else cut
        if cut <= 0 or cut >= len(text):
            raise ValueError(f"{path} is too short to split into calibration and held-out text.")
        return TextCorpus(name=path.stem, source=str(path), licence="(yours)",
                          calibration=text[:cut], heldout=text[cut:])
    try:
        import datasets  # noqa: F401  (optional, online only)
    except ImportError as e:
        raise FileNotFoundError(
            f"{source!r} is not a file here, and loading a Hugging Face data set needs "
            "`pip install datasets` and a network connection."
        ) from e
    name, _, config = str(source).partition(":")
    try:
        cal = datasets.load_dataset(name, config or None, split=split)
        held = datasets.load_dataset(name, config or None, split="test")
    except Exception as e:  # noqa: BLE001 - the hub's errors are many; ours is one sentence
        raise FileNotFoundError(f"Could not load the data set {source!r} ({e}). Are you online?") from e
    return TextCorpus(name=str(source), source="huggingface", licence="see the data set card",
                      calibration="\n\n".join(cal[text_field]), heldout="\n\n".join(held[text_field]))


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor (no special tokens), optionally truncated."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    return ids


def left_padded(tokenizer, texts: list[str]):
    """``texts`` tokenised as one left-padded batch (no special tokens): what batched generation needs. The
    tokenizer's own padding side is restored afterwards."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


def calibration_batch(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``(n_samples, seq_len)`` token windows starting at seeded random places of the *whole* text.

    Each window starts at a uniformly drawn character offset (so every document of a concatenated
    corpus is sampled in proportion to its length); the slice after it is tokenised, its first
    token (possibly a word cut in half) dropped, and the next ``seq_len`` tokens kept. Only the
    windows are tokenised, so a 10M-character corpus costs no more than a short one. Raises
    ``ValueError`` when the text is shorter than one window.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples={n_samples} and seq_len={seq_len} must be positive.")
    g = torch.Generator().manual_seed(seed)
    span = 8 * (seq_len + 1)  # characters per window: far more than seq_len + 1 tokens of prose or code
    if len(text) <= 4 * span:  # a short text: tokenise it all and draw token offsets
        ids = tokenize(tokenizer, text)
        if len(ids) < seq_len:
            raise ValueError(f"The calibration text has {len(ids)} tokens, fewer than one sequence of "
                             f"{seq_len}: give more text or a shorter seq_len.")
        starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=g)
        return ids[starts[:, None] + torch.arange(seq_len)[None, :]]
    starts = torch.randint(0, len(text) - span + 1, (n_samples,), generator=g).tolist()
    rows = [None] * n_samples
    todo = list(range(n_samples))
    while todo:  # a window of dense text always has enough tokens; sparse text gets a wider slice
        pieces = [text[starts[k]:starts[k] + span] for k in todo]
        enc = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for k, e in zip(todo, enc):
            if len(e) > seq_len:
                rows[k] = e[1:seq_len + 1]
        todo = [k for k in todo if rows[k] is None]
        if todo and span >= len(text):
            raise ValueError(f"The text has too few tokens for windows of {seq_len}: give more text "
                             "or a shorter seq_len.")
        span *= 2
        starts = [min(s, max(len(text) - span, 0)) for s in starts]
    return torch.tensor(rows, dtype=torch.long)
