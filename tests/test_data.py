"""pruning_lab.data: IDX parsing by hand, the embedded data sets, the text corpus split."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pruning_lab import data


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def test_read_idx_hand_made(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", a)
    write_idx(tmp_path / "x", a, gz=False)
    assert np.array_equal(data.read_idx(tmp_path / "x.gz"), a)
    assert np.array_equal(data.read_idx(tmp_path / "x"), a)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")
    a = np.zeros((4, 2), dtype=np.uint8)
    write_idx(tmp_path / "short", a, gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short")


def test_fashion_mnist_is_installed_and_parsed():
    d = data.load_image_data("fashion-mnist", val_size=5000, seed=0, fallback=False)
    assert d.name == "fashion-mnist" and len(d.classes) == 10
    assert d.x_train.shape == (55000, 1, 28, 28) and d.x_val.shape == (5000, 1, 28, 28)
    assert d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train.dtype == torch.int64 and set(d.y_test.unique().tolist()) == set(range(10))
    # normalised with training statistics (train + val are the original training set)
    full = torch.cat([d.x_train, d.x_val])
    assert abs(full.mean().item()) < 1e-3 and abs(full.std().item() - 1) < 1e-3
    assert torch.bincount(d.y_test).tolist() == [1000] * 10  # the real test set is balanced


def test_validation_split_is_carved_from_train_and_seeded():
    a = data.load_image_data(val_size=100, seed=1)
    b = data.load_image_data(val_size=100, seed=1)
    c = data.load_image_data(val_size=100, seed=2)
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert len(a.x_train) + len(a.x_val) == 60000 and len(a.x_test) == 10000
    # no validation image also sits in the training part (exact bytes; Fashion-MNIST has a few
    # duplicate images of its own, hence the small allowance)
    train_keys = {row.numpy().tobytes() for row in a.x_train.flatten(1)}
    overlap = sum(row.numpy().tobytes() in train_keys for row in a.x_val.flatten(1))
    assert overlap <= 2


def test_missing_dataset_errors_or_falls_back(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_image_data(root=tmp_path, fallback=False)
    with pytest.warns(UserWarning, match="digits"):
        d = data.load_image_data(root=tmp_path, val_size=5000)
    assert d.name == "digits" and d.x_train.shape[1:] == (1, 28, 28)
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown image data set"):
        data.load_image_data("cifar100")


def test_python_docs_corpus_split_never_overlaps():
    c = data.python_docs_corpus()
    assert set(c.calibration_docs).isdisjoint(c.heldout_docs)
    assert all(d.startswith("tutorial/") for d in c.heldout_docs)
    assert len(c.heldout) > 200_000 and len(c.calibration) > 5_000_000
    # long held-out paragraphs do not occur verbatim in the calibration text
    paras = [p for p in c.heldout.split("\n\n") if len(p) > 400][:50]
    assert paras and not any(p in c.calibration for p in paras)


def test_corpus_missing_gives_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        data.python_docs_corpus(tmp_path)


def test_the_data_folders_are_read_from_the_environment_when_used(tmp_path, monkeypatch):
    # set after the import, as a notebook or a test does: still obeyed (the folders were read at import time)
    monkeypatch.setenv("PRUNING_LAB_PYTHON_DOCS", str(tmp_path / "docs"))
    with pytest.raises(FileNotFoundError, match=f"No Python documentation sources in {tmp_path / 'docs'}"):
        data.python_docs_corpus()
    monkeypatch.setenv("PRUNING_LAB_FASHION_MNIST", str(tmp_path / "fm"))
    assert data.fashion_mnist_dir() == tmp_path / "fm"
    monkeypatch.setenv("PRUNING_LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=f"Fashion-MNIST was not found in {tmp_path / 'fm'}"):
        data.load_fashion_mnist(download=False)


class CharTokenizer:
    """One token per character: enough to test windowing by hand."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        if isinstance(text, list):
            return {"input_ids": [[ord(ch) % 128 for ch in t] for t in text]}
        return {"input_ids": [ord(ch) % 128 for ch in text]}


def test_calibration_batch_windows_are_seeded_slices():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    b1 = data.calibration_batch(CharTokenizer(), text, n_samples=5, seq_len=16, seed=3)
    b2 = data.calibration_batch(CharTokenizer(), text, n_samples=5, seq_len=16, seed=3)
    assert b1.shape == (5, 16) and torch.equal(b1, b2)
    ids = data.tokenize(CharTokenizer(), text)
    for row in b1:  # every window is a contiguous slice of the token stream
        start = int(row[0]) - 97
        assert any(torch.equal(ids[s:s + 16], row) for s in range(start % 26, len(ids) - 15, 26))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        data.calibration_batch(CharTokenizer(), "short", n_samples=1, seq_len=16)


def test_calibration_batch_samples_the_whole_corpus():
    # 400 "documents" of 6,000 characters, each its own number repeated: a window says where it came from
    docs = [f"{d:03d}|" * 1500 for d in range(400)]
    text = "".join(docs)
    batch = data.calibration_batch(CharTokenizer(), text, n_samples=200, seq_len=32, seed=1)
    assert batch.shape == (200, 32)
    assert torch.equal(batch, data.calibration_batch(CharTokenizer(), text, n_samples=200, seq_len=32, seed=1))
    assert not torch.equal(batch, data.calibration_batch(CharTokenizer(), text, n_samples=200, seq_len=32, seed=2))
    # every window is a contiguous slice of the text, found where its numbers say
    firsts = torch.tensor([text.index("".join(chr(c) for c in row)) for row in batch.tolist()])
    # windows start all over the 2.4M characters, not only in the first 2M (the old cut)
    assert firsts.max() > 0.9 * len(text) and firsts.min() < 0.1 * len(text)


def test_load_text_file_splits_without_overlap(tmp_path):
    paras = [f"Paragraph {i} " + "word " * 20 for i in range(50)]
    (tmp_path / "mine.txt").write_text("\n\n".join(paras))
    c = data.load_text(tmp_path / "mine.txt", heldout_fraction=0.2)
    assert c.calibration + c.heldout == "\n\n".join(paras)
    assert "Paragraph 49" in c.heldout and "Paragraph 49" not in c.calibration
    with pytest.raises(FileNotFoundError):
        data.load_text(tmp_path / "nope.txt")
