"""Configs load into typed objects; every impossible value is one clear ConfigError."""

from pathlib import Path

import pytest

from liquid_dist.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "tiny-anneal", "small", "base-moe", "xl-moe"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_the_annealing_example_is_tiny_with_an_annealing_stage():
    tiny, anneal = (load_config(CONFIGS / f"{n}.yaml") for n in ("tiny", "tiny-anneal"))
    assert anneal.model == tiny.model
    assert [s["start_step"] for s in anneal.data.stages] == [0, 240]
    assert anneal.data.stages[-1]["weights"] == {"web": 3, "curated": 7}
    assert set(anneal.data.val_sources) == {"web", "curated"}


def test_override_changes_typed_value():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.d_model=256", "model.moe.num_experts=8",
                                               "train.lr=3e-4", "model.dropout=0.1"])
    assert cfg.model.d_model == 256 and isinstance(cfg.model.d_model, int)
    assert cfg.model.moe.num_experts == 8
    assert cfg.train.lr == pytest.approx(3e-4)


def _err(overrides, tree=None):
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree or {}, overrides)
    return info.value


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("model.n_kv_heads=3", "model.n_kv_heads", "divisor of model.n_heads"),
        ("model.d_model=130", "model.d_model", "multiple of model.n_heads"),
        ("model.moe.top_k=9", "model.moe.top_k", "moe.num_experts"),
        ("model.window=0", "model.window", ">= 1"),
        ("model.d_model=abc", "model.d_model", "an integer"),
        ("model.dropout=1.5", "model.dropout", "probability"),
        ("model.attention_backend=fast", "model.attention_backend", "one of"),
        ("model.colour=blue", "model.colour", "no such key"),
        ("train.max_steps=0", "train.max_steps", ">= 1"),
        ("parallel.ep_size=3", "parallel.ep_size", "divisor of model.moe.num_experts"),
        ("parallel.zero_stage=4", "parallel.zero_stage", "one of"),
        ("data.encoder_length=100000", "data.encoder_length", "max_encoder_length"),
        ("model.tie_embeddings=1", "model.tie_embeddings", "boolean"),
        ("model.vocab_size=big", "model.vocab_size", "'auto'"),
        ("model.min_compression_ratio=0.9", "model.min_compression_ratio", "base_compression"),
    ],
)
def test_bad_value_names_key_value_and_expectation(override, key, fragment):
    err = _err([override, "model.base_compression_ratio=0.8"]
               if "compression" in override else [override])
    assert err.key == key
    assert fragment in str(err)
    assert repr(err.value) in str(err)


def test_unknown_section_is_refused():
    err = _err([], {"modle": {}})
    assert err.key == "modle" and "no such key" in str(err)


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError):
        config_from_dict({}, ["model.d_model"])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(lst)
