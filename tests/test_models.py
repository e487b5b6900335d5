"""pruning_lab.models: the small nets, the tiny Llama, and the embedded SmolLM2 with its cache."""

import json

import pytest
import torch

from pruning_lab import models
from pruning_lab.eval import count_parameters


def test_lenet_shape_and_parameter_count():
    m = models.make_model("lenet", seed=0)
    assert m(torch.zeros(7, 1, 28, 28)).shape == (7, 10)
    # 784*300+300 + 300*100+100 + 100*10+10, as in the LTH paper's 266k
    assert count_parameters(m) == 266_610


def test_seeded_initialisation_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.make_model("lenet", seed=5)
    after = torch.rand(1)
    b = models.make_model("lenet", seed=5)
    c = models.make_model("lenet", seed=6)
    assert torch.equal(before, after)  # make_model did not consume the global RNG
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


@pytest.mark.parametrize("name,expected_convs", [("conv2", 2), ("conv4", 4), ("conv6", 6)])
def test_conv_nets(name, expected_convs):
    m = models.make_model(name, seed=0, width=0.25)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == expected_convs
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_bad_model_requests():
    with pytest.raises(ValueError, match="Unknown model"):
        models.make_model("resnet50")
    with pytest.raises(ValueError, match="Conv-2"):
        models.ConvNet(conv_layers=3)


def test_tiny_llama_has_gqa_and_tied_embeddings():
    m = models.tiny_llama(seed=0)
    cfg = m.config
    assert cfg.num_attention_heads == 6 and cfg.num_key_value_heads == 2
    assert m.lm_head.weight is m.model.embed_tokens.weight
    out = m(input_ids=torch.arange(10)[None])
    assert out.logits.shape == (1, 10, cfg.vocab_size)


def test_embedded_model_is_the_real_smollm2():
    model, tok = models.load_llm()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
        30, 9, 3, 1536)
    assert count_parameters(model) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_cache_completeness_check(tmp_path):
    from pruning_lab._io import file_sha256

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert "a conversion did not finish" in models.cache_problem(folder)  # no stamp yet: half-written
    stamp = {"files": {"model.safetensors": 100}}
    (folder / "complete.json").write_text(json.dumps(stamp))
    assert "checksums" in models.cache_problem(folder)  # a stamp of sizes only (cache format v1) is not trusted
    stamp["sha256"] = {"model.safetensors": file_sha256(folder / "model.safetensors")}
    (folder / "complete.json").write_text(json.dumps(stamp))
    assert models.cache_problem(folder) is None
    (folder / "model.safetensors").write_bytes(b"x" * 50)  # truncated after the stamp
    assert models.cache_problem(folder) == "model.safetensors has 50 bytes, not 100"
    (folder / "model.safetensors").write_bytes(b"y" * 100)  # same size, other bytes
    assert models.cache_problem(folder) == "model.safetensors fails its SHA-256 checksum"
    assert models.cache_problem(folder, verify=False) is None  # sizes only
    (folder / "complete.json").write_text("{not json")
    assert models.cache_problem(folder) is not None


def tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(126)} | {"<unk>": 126, "</s>": 127}
    t = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """The embedded model's cache machinery, with the tiny Llama standing in for the GGUF's 540 MB: the real
    conversion's saving, checksums and checks, the real load_llm(); ``calls`` counts conversions."""
    monkeypatch.setenv("PRUNING_LAB_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    calls = []

    def dequantise(path):
        calls.append(path)
        return models.tiny_llama(seed=0), tiny_tokenizer()

    monkeypatch.setattr(models, "_dequantise", dequantise)
    monkeypatch.setattr(models, "_VERIFIED", set())
    return calls


def test_a_damaged_cache_is_rebuilt(fake_embedded):
    folder = models.embedded_model_folder()
    assert len(fake_embedded) == 1 and folder.name.endswith(f"-{models.CACHE_FORMAT}")
    assert models.embedded_model_folder() == folder and len(fake_embedded) == 1  # complete: reused
    (folder / "model.safetensors").write_bytes(b"")  # damage it
    with pytest.warns(UserWarning, match="model.safetensors has 0 bytes"):
        models.embedded_model_folder()
    assert len(fake_embedded) == 2


def test_bytes_flipped_in_the_middle_at_the_same_size_are_caught_and_rebuilt(fake_embedded):
    import time

    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40)[None]
    model, _ = models.load_llm()
    healthy = model(input_ids=ids).logits
    folder = models.embedded_model_folder()
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    time.sleep(0.05)  # a later modification time than the conversion's
    with open(weights, "r+b") as f:  # what the issue did to the real cache: 4 KB in the middle, same size
        f.seek(size // 2)
        chunk = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x55 for b in chunk))
    assert weights.stat().st_size == size
    damaged = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
    assert not torch.equal(damaged, healthy)  # it loads without a word: what the checksum is there for
    with pytest.warns(UserWarning) as caught:
        rebuilt, _ = models.load_llm()
    msg = str(caught[0].message)
    assert "is damaged (model.safetensors fails its SHA-256 checksum): rebuilding it" in msg and "\n" not in msg
    assert len(fake_embedded) == 2
    assert torch.equal(rebuilt(input_ids=ids).logits, healthy)


def test_checksums_are_read_once_per_process(fake_embedded, monkeypatch):
    folder = models.embedded_model_folder()
    reads = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda p: reads.append(p) or real(p))
    models._VERIFIED.clear()  # a new process
    models.embedded_model_folder()
    assert len(reads) == len(models.read_json(folder / "complete.json")["sha256"])
    models.embedded_model_folder()
    models.load_llm()
    assert len(reads) == len(models.read_json(folder / "complete.json")["sha256"])  # not again


def test_load_llm_leaves_the_progress_bars_as_it_found_them(fake_embedded):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    models.load_llm()
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    models.load_llm()
    assert not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()


def test_a_local_path_that_is_no_model_names_the_real_cause(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="the folder .*empty has no config.json, so it is not a saved Hugging Face "
                                      "model: save one with model.save_pretrained"):
        models.load_llm(empty)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>404 Not Found</html>")  # a failed download
    with pytest.raises(OSError, match=r"model.gguf is not a GGUF file: it starts with b'<htm'"):
        models.load_llm(fake)
    (empty / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(OSError, match="it holds weights.gguf: pass that file instead"):
        models.load_llm(empty)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(OSError, match="Could not load the local model .*broken.gguf': ") as err:
        models.load_llm(broken)
    assert "hub" not in str(err.value)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(OSError, match="weights.bin is a file but not a .gguf"):
        models.load_llm(other)


def test_unknown_model_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="load_llm\\(\\) with no argument"):
        models.load_llm("no-such-org/no-such-model")


def test_a_gguf_that_will_not_load(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(RuntimeError, match="could not be loaded"):
        models._convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bad_request_on_an_intact_embedded_cache_raises_without_rebuilding(monkeypatch):
    """An error that is the caller's (here a keyword from_pretrained refuses) is raised as it is: the intact cache is
    not converted again (that took ~30 s and then failed the same way)."""
    from pruning_lab import models

    models.embedded_model_folder()  # converted and intact
    rebuilt = []
    real = models.embedded_model_folder
    monkeypatch.setattr(models, "embedded_model_folder",
                        lambda rebuild=False, verify=True: rebuilt.append(rebuild) or real(verify=verify))
    with pytest.raises(Exception) as err:
        models.load_llm(None, dtype="no-such-dtype")
    assert rebuilt == [False] and "no-such-dtype" in str(err.value)
