"""LoraConfig: PEFT's fields and defaults, JSON round trip both ways, and named errors."""

import dataclasses
import json

import peft
import pytest

from dist_lora import LoraConfig


def test_defaults_are_peft_defaults():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        # peft_version records which PEFT wrote a file (None: not written by PEFT)
        if hasattr(theirs, f.name) and f.name not in ("peft_type", "target_modules", "peft_version"):
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_peft_config_round_trips_through_ours(tmp_path):
    theirs = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                             use_rslora=True, use_dora=True, rank_pattern={"q_proj": 4},
                             alpha_pattern={"v_proj": 8}, modules_to_save=["lm_head"], bias="lora_only",
                             layers_to_transform=[0, 1], layers_pattern="layers", init_lora_weights="gaussian",
                             task_type="CAUSAL_LM")
    theirs.save_pretrained(tmp_path)
    ours = LoraConfig.from_json(tmp_path / "adapter_config.json")
    assert (ours.r, ours.lora_alpha, ours.use_dora, ours.rank_pattern, ours.task_type) == (
        16, 32, True, {"q_proj": 4}, "CAUSAL_LM")
    ours.to_json(tmp_path / "adapter_config.json")
    back = peft.PeftConfig.from_pretrained(tmp_path)
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                "modules_to_save", "bias", "layers_to_transform", "layers_pattern", "init_lora_weights"):
        assert getattr(back, key) == getattr(theirs, key), key
    assert set(back.target_modules) == set(theirs.target_modules)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(init_lora_weights="pissa_maybe"), "init_lora_weights='pissa_maybe' is not a known"),
    (dict(use_dora=True, lora_bias=True), "lora_bias=True is not supported with DoRA"),
    (dict(bias="some"), "bias must be one of"),
    (dict(lora_dropout=1.0), "lora_dropout must lie in"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(target_modules=".*proj", layers_to_transform=[0]), "layers_to_transform cannot be used"),
    (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
    (dict(target_parameters="mlp.experts.gate_up_proj"), "target_parameters must be a list of parameter names"),
    (dict(target_parameters=["mlp.experts.down_proj"], lora_dropout=0.1), "lora_dropout=0.1 does not work with"),
])
def test_bad_fields_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LoraConfig(**kwargs)


def test_unsupported_peft_features_are_refused_and_unknown_keys_warned():
    with pytest.raises(ValueError, match="fan_in_fan_out=True is not supported"):
        LoraConfig.from_dict({"r": 4, "fan_in_fan_out": True})
    with pytest.warns(UserWarning, match="ignored adapter_config.json keys: \\['future_key'\\]"):
        LoraConfig.from_dict({"r": 4, "future_key": 1})


def test_target_parameters_round_trip_with_peft(tmp_path):
    theirs = peft.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                                "mlp.experts.down_proj"],
                             rank_pattern={"model.layers.1.mlp.experts.down_proj": 2})
    theirs.save_pretrained(tmp_path)
    ours = LoraConfig.from_json(tmp_path / "adapter_config.json")
    assert ours.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    ours.to_json(tmp_path / "adapter_config.json")
    assert peft.PeftConfig.from_pretrained(tmp_path).target_parameters == theirs.target_parameters
