import pytest
import yaml

from mimkit.config import ConfigError, config_from_dict, load_config, save_config, to_dict, validate


def test_presets_load_and_say_what_they_change():
    base = load_config("configs/mae_vit_base_imagenet.yaml")
    assert (base.model.encoder.embed_dim, base.model.encoder.depth, base.model.decoder.depth) == (768, 12, 8)
    assert base.optim.base_lr == 1.5e-4 and base.optim.betas == (0.9, 0.95) and base.method.masking.ratio == 0.75
    fm = load_config("configs/mae_fashion_mnist.yaml")
    assert fm.model.encoder.patch_size == 4 and fm.model.encoder.in_chans == 1 and fm.data.dataset == "fashion_mnist"
    assert fm.method.norm_target is True  # inherited


def test_overrides_types_and_nested_method_options():
    cfg = load_config("configs/mae_fashion_mnist.yaml", ["optim.base_lr=3e-4", "method.masking.ratio=0.6",
                                                           "data.crop_scale=[0.3,1.0]", "train.epochs=1"])
    assert cfg.optim.base_lr == 3e-4 and cfg.method.masking.ratio == 0.6
    assert cfg.data.crop_scale == (0.3, 1.0) and cfg.train.epochs == 1.0


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'base_lr'"):
        load_config(None, ["optim.base_lrr=1"])
    with pytest.raises(ConfigError, match="unknown config section 'optm'.*'optim'"):
        load_config(None, ["optm.base_lr=1"])
    with pytest.raises(ConfigError, match="unknown method 'mea'.*'mae'"):
        load_config(None, ["method.name=mea"])
    with pytest.raises(ConfigError, match="method.masking.ratoi"):
        load_config(None, ["method.masking.ratoi=0.5"])


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.epochs: expected a number"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="train.progress_bar: expected true/false"):
        load_config(None, ["train.progress_bar=3"])
    with pytest.raises(ConfigError, match="train.compile.*is not one of auto, true, false"):  # true, false or auto
        validate(load_config(None, ["train.compile=3"]), check_environment=False)
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/mae_fashion_mnist.yaml", ["optim.base_lr=2e-4"])
    save_config(cfg, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


def test_a_union_field_names_every_form_it_takes():
    from mimkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model.encoder.img_size: expected an integer, got \[32\]; or expected 2 "
                                          r"values, got 1"):
        load_config(None, ["model.encoder.img_size=[32]"])
