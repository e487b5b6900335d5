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
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert not models._cache_is_complete(folder)  # no stamp yet: half-written
    (folder / "complete.json").write_text(json.dumps({"files": {"model.safetensors": 100}}))
    assert models._cache_is_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 50)  # truncated after the stamp
    assert not models._cache_is_complete(folder)
    (folder / "complete.json").write_text("{not json")
    assert not models._cache_is_complete(folder)


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_LAB_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, folder):
        calls.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"ok")
        (folder / "complete.json").write_text(json.dumps({"files": {"model.safetensors": 2}}))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    folder = models.embedded_model_folder()
    assert len(calls) == 1
    assert models.embedded_model_folder() == folder and len(calls) == 1  # complete: reused
    (folder / "model.safetensors").write_bytes(b"")  # damage it
    models.embedded_model_folder()
    assert len(calls) == 2


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
