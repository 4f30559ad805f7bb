"""The scale ladder -> OLMo configs, seeded models, and checkpoints as save_pretrained folders."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from echochamber import models
from echochamber.data import synthetic
from echochamber.data import tokenizer as ec_tokenizer
from echochamber.formats import document

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64}
PAPER = {  # docs/paper.md, "Pretraining data and models"
    "150M": {"d_model": 768, "n_layers": 12, "n_heads": 12, "mlp_hidden": 3072, "tie_embeddings": False},
    "1B": {"d_model": 2048, "n_layers": 16, "n_heads": 16, "mlp_hidden": 8192, "tie_embeddings": True},
}


@pytest.fixture(scope="module")
def tok():
    rows = synthetic.generate("omi1", "omi1", "train", 60, seed=0, difficulty=synthetic.Difficulty())
    return ec_tokenizer.train_bpe([document(r["question"], r["solution"]) for r in rows], 300)


def test_olmo_config_follows_the_scale_and_the_paper_shape():
    c = models.olmo_config(PAPER["1B"], 32000, eos_id=2, pad_id=0, max_len=2048)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (2048, 16, 16, 8192)
    assert c.tie_word_embeddings and c.vocab_size == 32000 and c.max_position_embeddings == 2048
    assert c.hidden_act == "silu" and not c.attention_bias and c.clip_qkv is None
    assert c.bos_token_id is None and c.eos_token_id == 2 and c.pad_token_id == 0
    c = models.olmo_config(PAPER["150M"], 32000, eos_id=2, pad_id=0, max_len=256)
    assert not c.tie_word_embeddings and c.max_position_embeddings == 256      # context from seq_len
    c = models.olmo_config({**PAPER["150M"], "context": 2048}, 32000, eos_id=2, pad_id=0, max_len=256)
    assert c.max_position_embeddings == 2048                                    # context from the scale
    with pytest.raises(ValueError, match="shorter than the sequence length"):
        models.olmo_config({**TINY, "context": 32}, 100, eos_id=0, pad_id=1, max_len=64)


def test_paper_scales_have_the_paper_parameter_counts():
    def count(scale):
        with torch.device("meta"):
            return models.count_params(AutoModelForCausalLM.from_config(
                models.olmo_config(scale, 32000, eos_id=2, pad_id=0, max_len=2048)))
    assert 150e6 < count(PAPER["150M"]) < 170e6       # 113M in the blocks + two 24.6M tables
    assert 1.1e9 < count(PAPER["1B"]) < 1.2e9        # 1.07B in the blocks + one tied 65.5M table


def test_build_is_seeded_olmo_shaped_and_leaves_the_global_rng_alone(tok):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.build(TINY, tok, 64, seed=0)
    assert torch.equal(torch.rand(1), before)
    b, c = models.build(TINY, tok, 64, seed=0), models.build(TINY, tok, 64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    names = [n for n, _ in a.named_parameters()]
    assert not any("bias" in n or "norm" in n for n in names)    # no biases, non-parametric LayerNorm
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    mlp = a.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == TINY["mlp_hidden"]   # SwiGLU


def test_count_params_counts_tied_weights_once(tok):
    d, v, L, h = TINY["d_model"], len(tok), TINY["n_layers"], TINY["mlp_hidden"]
    per_layer = 4 * d * d + 3 * d * h
    untied = models.build(TINY, tok, 64, seed=0)
    tied = models.build({**TINY, "tie_embeddings": True}, tok, 64, seed=0)
    assert models.count_params(untied) == L * per_layer + 2 * v * d
    assert models.count_params(tied) == L * per_layer + v * d
    assert models.count_params(untied, embeddings=False) == L * per_layer + v * d
    assert models.count_params(tied, embeddings=False) == L * per_layer + v * d


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_round_trip_loads_with_auto_classes_and_generates(tok, tmp_path, tie):
    model = models.build({**TINY, "tie_embeddings": tie}, tok, 64, seed=0)
    path = models.save_checkpoint(model, tok, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]          # nothing half-written left
    auto = AutoModelForCausalLM.from_pretrained(path)
    auto_tok = AutoTokenizer.from_pretrained(path)
    loaded, loaded_tok = models.load_checkpoint(path)
    ids = auto_tok("Ava has 12 apples.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, auto(ids).logits)
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    out = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=loaded_tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(loaded_tok.decode(out[0, ids.shape[1]:]), str)
    assert loaded.config.tie_word_embeddings is tie
    half, _ = models.load_checkpoint(path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_save_replaces_an_existing_checkpoint(tok, tmp_path):
    models.save_checkpoint(models.build(TINY, tok, 64, seed=0), tok, tmp_path / "model")
    second = models.build(TINY, tok, 64, seed=1)
    models.save_checkpoint(second, tok, tmp_path / "model")
    loaded, _ = models.load_checkpoint(tmp_path / "model")
    assert all(torch.equal(x, y) for x, y in zip(second.parameters(), loaded.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _one_sentence(message: str, path) -> None:
    assert str(path) in message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("damage", ["missing", "no_config", "no_weights", "truncated", "garbage", "no_tokenizer",
                                    "wrong_shape"])
def test_missing_or_corrupt_checkpoint_raises_one_sentence_naming_the_path(tok, tmp_path, damage):
    path = tmp_path / "ckpt"
    if damage != "missing":
        models.save_checkpoint(models.build(TINY, tok, 64, seed=0), tok, path)
    weights = path / "model.safetensors"
    if damage == "no_config":
        (path / "config.json").unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file" * 50)
    elif damage == "no_tokenizer":
        (path / "tokenizer_config.json").unlink()
    elif damage == "wrong_shape":    # weights of another scale under this config
        other = models.build({**TINY, "d_model": 64}, tok, 64, seed=0)
        other.save_pretrained(tmp_path / "other")
        (tmp_path / "other" / "model.safetensors").replace(weights)
    with pytest.raises(models.CheckpointError) as err:
        models.load_checkpoint(path)
    _one_sentence(str(err.value), path)
