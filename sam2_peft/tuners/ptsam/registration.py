"""Everything that teaches peft about PTSAM, in one function.

peft 0.21 registers custom methods with `peft.utils.register_peft_method`, but that function only accepts a name that
is already a member of `peft.utils.PeftType`, and that enum is closed. `register_ptsam` therefore adds the member
`PeftType.PTSAM` (unless a future peft ships one) and then calls the public registration. Both steps touch peft's and
Python's internals, so they live here alone: if a peft or Python upgrade breaks them, this function is the only thing
to fix, and `tests/test_ptsam_registration.py` says so.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

PTSAM_NAME = "ptsam"
PTSAM_PREFIX = "ptsam_"


class PtsamRegistrationError(RuntimeError):
    """peft could not be taught the PTSAM method (usually an incompatible peft version)."""


def register_ptsam(config_cls: type, model_cls: type) -> PeftType:
    """Make `PeftType.PTSAM` exist and map it to `config_cls` / `model_cls` in peft's registries. Idempotent.

    After this, `get_peft_model`, `PeftModel.from_pretrained`, `PeftConfig.from_pretrained` and `AutoPeftModel` treat
    `"peft_type": "PTSAM"` in `adapter_config.json` like any built-in method. Returns the enum member.

    Raises:
        PtsamRegistrationError: the enum could not be extended or peft rejected the registration; the message names
            the installed peft version.
    """
    member = _peft_type_member(PTSAM_NAME.upper())
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(member), PEFT_TYPE_TO_TUNER_MAPPING.get(member)
    if registered == (config_cls, model_cls):
        return member
    if any(cls is not None for cls in registered):
        raise PtsamRegistrationError(f"peft already maps {member!r} to {registered}; cannot register PTSAM twice.")
    try:
        register_peft_method(name=PTSAM_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PTSAM_PREFIX)
    except (KeyError, TypeError, ValueError) as err:
        raise PtsamRegistrationError(_incompatible(f"register_peft_method refused PTSAM: {err}")) from err
    return member


def _peft_type_member(name: str) -> PeftType:
    """`PeftType[name]`, adding the member to the closed enum first if it is missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    try:
        add_member = getattr(PeftType, "_add_member_", None)  # Python >= 3.13
        if add_member is not None:
            add_member(name, member)
        else:
            type.__setattr__(PeftType, name, member)
            PeftType._member_map_[name] = member
            PeftType._member_names_.append(name)
        PeftType._value2member_map_[name] = member
    except (AttributeError, TypeError) as err:
        raise PtsamRegistrationError(_incompatible(f"could not add {name} to peft's PeftType enum: {err}")) from err
    if PeftType(name) is not member or PeftType[name] is not member or member not in list(PeftType):
        raise PtsamRegistrationError(_incompatible(f"PeftType.{name} was added but does not behave as an enum member"))
    return member


def _incompatible(detail: str) -> str:
    import peft

    return (
        f"sam2_peft could not register PTSAM with peft {peft.__version__} ({detail}). "
        "sam2_peft's PTSAM is tested with peft 0.21; install that version or report this message."
    )
