"""launcher/model_shape.py: a model's dimensions from config.json files as transformers writes them for several
families (names that differ, a head width of its own, a multimodal model's text config), and what is missing said."""
import json

import pytest

from launcher.model_shape import Shape, model_shape

QWEN2_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_llama_style_names():
    shape = Shape.from_config(QWEN2_1_5B)
    assert shape == Shape(1536, 8960, 28, 12, 2, 151936, True)
    assert shape.kv_dim == 256 and shape.attention_dim == 1536
    assert shape.total_params() == pytest.approx(1.54e9, rel=0.01)  # Qwen2.5-1.5B's published 1.54B


def test_gpt2_names_and_its_4x_mlp():
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None, "vocab_size": 50257}
    shape = Shape.from_config(gpt2)
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads) == (768, 3072, 12, 12, 12)


def test_falcon_style_names_and_multi_query_attention():
    falcon = {"model_type": "falcon", "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
              "multi_query": True, "vocab_size": 65024}
    shape = Shape.from_config(falcon)
    assert (shape.kv_heads, shape.kv_dim, shape.intermediate) == (1, 64, 4 * 4544)


def test_a_head_width_of_its_own_sizes_the_attention_projections():
    gemma2_2b = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
                 "tie_word_embeddings": True}
    projections = Shape.from_config(gemma2_2b).projections()
    assert projections["q_proj"] == (2304, 2048) and projections["o_proj"] == (2048, 2304)
    assert projections["k_proj"] == projections["v_proj"] == (2304, 1024)


def test_a_multimodal_config_gives_its_language_models_dimensions():
    nested = {"model_type": "qwen2_5_vl_like", "text_config": QWEN2_1_5B, "vision_config": {"hidden_size": 1280}}
    assert Shape.from_config(nested) == Shape.from_config(QWEN2_1_5B)


def test_what_is_missing_is_named_with_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "vocab_size": 100, "n_head": 4}))
    with pytest.raises(ValueError, match=r"config.json of model.path=.* gives no hidden_size, num_hidden_layers "
                                         r"\(nor n_embd, d_model, n_layer, num_layers\)"):
        model_shape({"path": str(tmp_path), "name": "mine"})
    with pytest.raises(ValueError, match=r"gives no vocab_size$"):  # no other names to list
        Shape.from_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2})
    with pytest.raises(ValueError, match=r"intermediate_size=\[64, 128\] is not one whole number"):
        Shape.from_config(dict(QWEN2_1_5B, intermediate_size=[64, 128]))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not JSON"):
        model_shape({"path": str(tmp_path), "name": "mine"})


def test_a_hub_id_downloaded_before_is_read_from_the_hub_cache(tmp_path, monkeypatch):
    """No network: huggingface_hub's cache layout, models--org--name/snapshots/<commit>/config.json."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--someorg--tiny-qwen" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN2_1_5B))
    (tmp_path / "models--someorg--tiny-qwen" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-qwen" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_shape({"path": "someorg/tiny-qwen", "shape": None}) == Shape.from_config(QWEN2_1_5B)
    with pytest.raises(ValueError, match="no config.json here and no model.shape"):
        model_shape({"path": "someorg/not-downloaded", "shape": None})
