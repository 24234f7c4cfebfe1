"""PTSAM's registration with peft (the one place that works around peft's closed PeftType enum).

If a peft upgrade breaks these tests, fix `sam2_peft/tuners/ptsam/registration.py::register_ptsam` and nothing else.
"""

import json

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import sam2_peft  # noqa: F401
from sam2_peft.tuners.ptsam import PtsamConfig, PtsamModel, PtsamRegistrationError, register_ptsam


def test_import_registers_ptsam_as_a_peft_type():
    member = PeftType.PTSAM
    assert PeftType("PTSAM") is member and PeftType["PTSAM"] is member and member in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PTSAM"] is PtsamConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is PtsamModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "ptsam_"


def test_registration_is_idempotent_and_refuses_a_different_class():
    assert register_ptsam(PtsamConfig, PtsamModel) is PeftType.PTSAM

    class Other(PtsamConfig):
        pass

    with pytest.raises(PtsamRegistrationError, match="already maps"):
        register_ptsam(Other, PtsamModel)


def test_config_round_trips_through_peft_config(tmp_path):
    PtsamConfig(num_tokens=4, encoder_prompts=2, encoder_stages=[3, 1], output_mask="best").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PTSAM" and saved["encoder_stages"] == [1, 3]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PtsamConfig) and loaded.peft_type is PeftType.PTSAM
    assert (loaded.num_tokens, loaded.encoder_prompts, loaded.output_mask) == (4, 2, "best")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"token_init": "zeros"}, "token_init"),
        ({"output_mask": "multi4"}, "output_mask"),
        ({"encoder_prompts": -1}, "encoder_prompts"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PtsamConfig(**kwargs)
