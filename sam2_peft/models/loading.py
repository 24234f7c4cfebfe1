"""Loading SAM 2 base models and processors: Hub ids, local folders, the built-in random architectures and the
small built-in model pre-trained on synthetic scenes."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from transformers import (
    EdgeTamConfig,
    EdgeTamVideoConfig,
    PretrainedConfig,
    Sam2Config,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam3TrackerConfig,
    Sam3TrackerProcessor,
    Sam3TrackerVideoConfig,
    TimmWrapperConfig,
)

from .names import (  # noqa: F401
    BUILTIN_ARCHITECTURES,
    BUILTIN_PRETRAINED,
    DEFAULT_MODEL,
    FAMILIES,
    BuiltinArchitecture,
    Family,
    family_of_model_type,
)

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
"""How long to wait for a TCP connection to the Hub before calling it unreachable (instead of minutes of retries)."""

OTHER_BASES = (
    "A local folder saved with save_pretrained or a Meta checkpoint (--model sam2.1_hiera_small.pt --meta-config "
    "sam2.1_hiera_s) works too; without SAM 2 weights use --model compact-synthetic (shipped, pre-trained on "
    "synthetic scenes only: a test base that segments, not SAM 2) or --model tiny-random (random weights, smoke tests)."
)

RANDOM_WEIGHTS_KEY = "sam2_peft_random_weights"
"""Key written into the config of built-in models so that saved folders say their weights are random."""


class Sam2LoadError(RuntimeError):
    """A base model could not be loaded; the message names what was asked for and what to do."""


def small_sam2_config(
    image_size: int,
    widths: list[int],
    blocks: list[int],
    heads: list[int],
    hidden: int,
    decoder_heads: int,
    video: bool = False,
) -> Sam2Config | Sam2VideoConfig:
    """A reduced SAM 2: Hiera with the given stage `widths`/`blocks`/`heads`, neck and decoder of width `hidden`.

    The last-but-one block attends globally, as in the full models; everything else keeps SAM 2's layout. Video
    configs size memory attention's RoPE grid to the image (transformers' default assumes 1024 px).
    """
    sizes = [[image_size // 4] * 2, [image_size // 8] * 2, [image_size // 16] * 2]
    kwargs = dict(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                image_size=[image_size, image_size],
                hidden_size=widths[0],
                embed_dim_per_stage=widths,
                num_attention_heads_per_stage=heads,
                blocks_per_stage=blocks,
                window_size_per_stage=[8, 4, 8, 4],
                global_attention_blocks=[sum(blocks) - 2],
            ),
            backbone_channel_list=widths[::-1],
            backbone_feature_sizes=sizes,
            fpn_hidden_size=hidden,
        ),
        prompt_encoder_config=dict(hidden_size=hidden, image_size=image_size, patch_size=16),
        mask_decoder_config=dict(
            hidden_size=hidden, mlp_dim=4 * hidden, num_attention_heads=decoder_heads, iou_head_hidden_dim=hidden
        ),
    )
    if video:
        return Sam2VideoConfig(**kwargs, **_small_memory(image_size, image_size // 16, hidden))
    return Sam2Config(**kwargs)


def _small_memory(image_size: int, grid: int, hidden: int) -> dict:
    """Video config fields of a small model: one memory-attention layer of width `hidden`, RoPE on a `grid` x `grid`
    feature map, 64 memory channels."""
    return dict(
        image_size=image_size,
        memory_attention_hidden_size=hidden,
        memory_attention_num_layers=1,
        memory_attention_rope_feat_sizes=[grid, grid],
        memory_attention_feed_forward_hidden_size=4 * hidden,
        memory_encoder_hidden_size=hidden,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden,
        memory_fuser_intermediate_dim=4 * hidden,
    )


def tiny_config(image_size: int = 256, video: bool = False) -> Sam2Config | Sam2VideoConfig:
    """A ~0.5 M parameter SAM 2 (Hiera widths 16-128, decoder width 64) for tests and offline smoke runs.

    The video variant (~2 M parameters) uses width 128 for the decoder and memory attention: transformers' video
    inference fails when that width equals the 64-channel memory.
    """
    hidden = 128 if video else 64
    return small_sam2_config(image_size, [16, 32, 64, 128], [1, 1, 2, 1], [1, 1, 2, 4], hidden, 2, video)


def compact_config(image_size: int = 256, video: bool = False) -> Sam2Config | Sam2VideoConfig:
    """A ~2.3 M parameter SAM 2 (Hiera widths 32-256, decoder width 128): big enough to learn, small enough for CPU."""
    return small_sam2_config(image_size, [32, 64, 128, 256], [1, 2, 3, 1], [1, 2, 4, 8], 128, 4, video)


def hiera_tiny_config(video: bool = False) -> Sam2Config | Sam2VideoConfig:
    """The sam2.1-hiera-tiny architecture at 1024 px (transformers' defaults), for benchmarks."""
    return Sam2VideoConfig() if video else Sam2Config()


def _tiny_heads(image_size: int, patch_size: int, video: bool) -> dict:
    """The prompt encoder, mask decoder (width 64; 128 for video, as `tiny_config`) and memory of a tiny model."""
    hidden = 128 if video else 64
    kwargs = dict(
        prompt_encoder_config=dict(hidden_size=hidden, image_size=image_size, patch_size=patch_size),
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=4 * hidden, num_attention_heads=2, iou_head_hidden_dim=64),
    )
    if video:
        kwargs.update(_small_memory(image_size, image_size // patch_size, hidden))
    return kwargs


def edgetam_tiny_config(image_size: int = 256, video: bool = False) -> EdgeTamConfig | EdgeTamVideoConfig:
    """A tiny EdgeTAM: a RepViT image encoder (timm `repvit_m1` layout, widths 16-128, one block per stage)."""
    widths = [16, 32, 64, 128]
    backbone = TimmWrapperConfig(
        architecture="repvit_m1",
        model_args={"in_chans": 3, "features_only": True, "out_indices": (0, 1, 2, 3), "embed_dim": widths},
    )
    hidden = 128 if video else 64
    vision = dict(
        model_type="edgetam_vision_model",
        backbone_config=backbone,
        backbone_channel_list=widths[::-1],
        backbone_feature_sizes=[[image_size // s] * 2 for s in (4, 8, 16)],
        fpn_hidden_size=hidden,
    )
    config_cls = EdgeTamVideoConfig if video else EdgeTamConfig
    return config_cls(vision_config=vision, **_tiny_heads(image_size, 16, video))


def sam3_tracker_tiny_config(image_size: int = 224, video: bool = False) -> Sam3TrackerConfig | Sam3TrackerVideoConfig:
    """A tiny SAM 3 tracker: a 2-layer ViT (width 64, patch 14, one windowed and one global layer)."""
    grid = image_size // 14
    hidden = 128 if video else 64
    backbone = dict(
        model_type="sam3_vit_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        pretrain_image_size=image_size,
        patch_size=14,
        window_size=grid // 2,
        global_attn_indexes=[1],
    )
    vision = dict(
        backbone_config=backbone,
        fpn_hidden_size=hidden,
        backbone_feature_sizes=[[grid * 4] * 2, [grid * 2] * 2, [grid] * 2],
    )
    config_cls = Sam3TrackerVideoConfig if video else Sam3TrackerConfig
    return config_cls(vision_config=vision, **_tiny_heads(image_size, 14, video))


_BUILTIN_CONFIGS = {
    "tiny-random": lambda video: tiny_config(256, video),
    "compact-random": lambda video: compact_config(256, video),
    "hiera-tiny-random": hiera_tiny_config,
    "edgetam-tiny-random": lambda video: edgetam_tiny_config(256, video),
    "sam3-tracker-tiny-random": lambda video: sam3_tracker_tiny_config(224, video),
}


def family_of(model_or_config: torch.nn.Module | PretrainedConfig) -> Family:
    """The family of a model (peft-wrapped or not) or config; SAM 2 for anything this toolkit does not know."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_of_model_type(getattr(config, "model_type", "")) or FAMILIES["sam2"]


def family_classes(family: Family, video: bool) -> tuple[type, type]:
    """transformers' (config class, model class) of `family`, for images or video."""
    names = family.classes[2:] if video else family.classes[:2]
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def builtin_config(name: str, video: bool = False) -> Sam2Config | Sam2VideoConfig:
    """The config of a built-in architecture (`BUILTIN_ARCHITECTURES`), for images or video."""
    return _BUILTIN_CONFIGS[name](video)


def tie_positional_encodings(model: Sam2Model | Sam2VideoModel) -> None:
    """Make the prompt encoder use the image's positional-encoding matrix, as real checkpoints do.

    A model built from a config gets two different random matrices; untied, a prompt cannot be located on the
    image and training collapses to a constant mask.
    """
    shared = model.shared_image_embedding.positional_embedding
    model.prompt_encoder.shared_embedding.positional_embedding.data.copy_(shared.data)


def build_model_from_config(config: PretrainedConfig, seed: int | None = 0) -> Sam2Model | Sam2VideoModel:
    """Build a randomly initialised model of the SAM 2 family from its config, with tied positional encodings."""
    if seed is not None:
        torch.manual_seed(seed)
    family = family_of(config)
    model_cls = family_classes(family, video="video" in config.model_type)[1]
    model = _instantiate(family, lambda: model_cls(config))
    declare_no_word_embeddings(model)
    tie_positional_encodings(model)
    setattr(model.config, RANDOM_WEIGHTS_KEY, True)
    return model.eval()


def _instantiate(family: Family, make):
    """Run `make()`, turning a missing optional package (EdgeTAM's timm) into a `Sam2LoadError` naming the extra."""
    try:
        return make()
    except ImportError as err:
        raise Sam2LoadError(
            f"{family.title} models need a package that is not installed ({err}): pip install "
            f"'sam2-peft[{family.extra}]'."
        ) from err


def declare_no_word_embeddings(model: torch.nn.Module) -> None:
    """Say in the config that no weights are tied to input embeddings: EdgeTAM declares `_tied_weights_keys` but has
    no `get_input_embeddings`, which makes peft's `get_peft_model` fail."""
    model.config.tie_word_embeddings = False


def processor_for_image_size(image_size: int, family: Family | None = None) -> Sam2Processor:
    """The family's processor resizing to `image_size` with low-resolution masks at a quarter of it.

    The SAM 3 tracker normalises with mean and std 0.5 (its checkpoints' processor); SAM 2 and EdgeTAM with ImageNet's.
    """
    sam3 = family is not None and family.name == "sam3_tracker"
    image_processor = Sam2ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": image_size // 4, "width": image_size // 4},
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if sam3 else {}),
    )
    return (Sam3TrackerProcessor if sam3 else Sam2Processor)(image_processor=image_processor)


def model_image_size(model: Sam2Model | Sam2VideoModel) -> int:
    """The square input size the model was built for (it accepts no other)."""
    return int(model.config.prompt_encoder_config.image_size)


def is_random_weights(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), RANDOM_WEIGHTS_KEY, False))


def load_base_model(
    name_or_path: str,
    *,
    video: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    meta_config: str | None = None,
) -> tuple[Sam2Model | Sam2VideoModel, Sam2Processor]:
    """Load a SAM 2 base model and its processor.

    Args:
        name_or_path: a Hub id (`facebook/sam2.1-hiera-small`), a local folder saved with `save_pretrained`,
            a Meta checkpoint (`*.pt`, needs `meta_config`), a `config.json` (random weights, for pre-training),
            a built-in random architecture (`tiny-random`, `compact-random`, `hiera-tiny-random`; smoke tests
            and pre-training only, never pretrained), or `compact-synthetic` (shipped, pre-trained on synthetic
            scenes: a test base that segments).
        video: load `Sam2VideoModel` instead of `Sam2Model`.
        dtype: weights dtype (`torch.float16`, `"bfloat16"`, ...); default float32.
        device: where to put the model.
        revision: Hub revision (branch, tag or commit).
        meta_config: Meta config name or YAML for `.pt` checkpoints (e.g. `sam2.1_hiera_s`).

    Raises:
        Sam2LoadError: the model could not be found or fetched; never falls back to random weights.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if name_or_path in BUILTIN_ARCHITECTURES:
        arch = BUILTIN_ARCHITECTURES[name_or_path]
        logger.warning(
            "Using the built-in architecture '%s' (%s). Its weights are RANDOM: use it for smoke tests, not results.",
            arch.name,
            arch.description,
        )
        model = build_model_from_config(builtin_config(arch.name, video))
        model.config._name_or_path = arch.name
        processor = processor_for_image_size(arch.image_size, family_of(model))
    elif name_or_path in BUILTIN_PRETRAINED:
        if video:
            raise Sam2LoadError(f"'{name_or_path}' was pre-trained on images only; it has no trained video memory.")
        model, processor = _load_pretrained(str(BUILTIN_PRETRAINED[name_or_path]), video=False, revision=None)
        model.config._name_or_path = name_or_path
        logger.info("Using '%s': pre-trained on synthetic scenes only (a test base, not SAM 2).", name_or_path)
    elif name_or_path.endswith(".json"):
        model = build_model_from_config(_config_from_json(name_or_path, video))
        model.config._name_or_path = name_or_path
        logger.warning("Built '%s' from a config file: its weights are RANDOM.", name_or_path)
        processor = processor_for_image_size(model_image_size(model), family_of(model))
    elif name_or_path.endswith((".pt", ".pth")):
        model, processor = _load_meta_checkpoint(name_or_path, meta_config, video)
    else:
        check_model_name(name_or_path)
        model, processor = _load_pretrained(name_or_path, video, revision)
    declare_no_word_embeddings(model)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def builtin_names() -> list[str]:
    return [*BUILTIN_ARCHITECTURES, *BUILTIN_PRETRAINED]


def check_model_name(name_or_path: str) -> None:
    """Fail fast, before any download, on a model name that can only be a mistake.

    A path (`./x`, `/x`, `~/x`, `../x`, or anything that is not `org/name`) must be an existing folder; a bare
    name that is not built in is a typo (the closest built-in name is suggested) rather than a Hub id.
    """
    if os.path.isdir(name_or_path):
        return
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if os.path.exists(name_or_path):
        raise Sam2LoadError(
            f"Model '{name_or_path}' is a file, not a model folder (a folder saved with "
            "save_pretrained, a Meta .pt checkpoint, or a config .json)."
        )
    if looks_like_path:
        raise Sam2LoadError(
            f"Model '{name_or_path}': no such folder ({Path(name_or_path).expanduser().resolve()}). Give a folder "
            "saved with save_pretrained, a Hub id such as facebook/sam2.1-hiera-small, or a built-in name "
            f"({', '.join(builtin_names())})."
        )
    if "/" not in name_or_path:
        close = difflib.get_close_matches(name_or_path, builtin_names(), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise Sam2LoadError(
            f"Model '{name_or_path}' is neither a built-in model nor a Hub id of the form org/name: {hint}"
            f"Built-in: {', '.join(builtin_names())}; Hub: e.g. {DEFAULT_MODEL}."
        )


def offline_fix() -> str:
    """What to do about the Hub when a download is impossible or failed: the advice depends on HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so only the Hugging Face cache is used: unset it to download."
    return "Without a network connection, set HF_HUB_OFFLINE=1 to use what is already in the Hugging Face cache."


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached (a name or connection failure within `timeout` seconds), or None if it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE is set)"
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"the Hugging Face Hub is unreachable (cannot connect to {endpoint.hostname}:{port}: {err})"
    return None


def _is_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def _config_from_json(path: str, video: bool) -> PretrainedConfig:
    """The config in a JSON file, as the image or video config of the family its `model_type` names (SAM 2 when it
    names none)."""
    try:
        model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type", "")
    except (OSError, ValueError) as err:
        raise Sam2LoadError(f"Cannot read a config from '{path}': {err}") from err
    family = family_of_model_type(model_type) or FAMILIES["sam2"]
    config_cls = family_classes(family, video)[0]
    try:
        return config_cls.from_json_file(path)
    except (OSError, ValueError, TypeError) as err:
        raise Sam2LoadError(f"Cannot build a {config_cls.__name__} from '{path}': {err}") from err


def _family_at(name_or_path: str, revision: str | None, local_only: bool) -> Family:
    """The family named by the `model_type` of a Hub repo's or folder's config (SAM 2 when it names none)."""
    config, _ = PretrainedConfig.get_config_dict(name_or_path, revision=revision, local_files_only=local_only)
    model_type = config.get("model_type", "")
    family = family_of_model_type(model_type)
    if family is None and model_type:
        known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
        raise Sam2LoadError(
            f"'{name_or_path}' holds a '{model_type}' model, not one of the SAM 2 family ({known}). {OTHER_BASES}"
        )
    return family or FAMILIES["sam2"]


def _load_pretrained(name_or_path: str, video: bool, revision: str | None) -> tuple[torch.nn.Module, Sam2Processor]:
    is_local = os.path.isdir(name_or_path)
    local_only = False
    if not is_local:
        unreachable = hub_unreachable_reason()
        local_only = unreachable is not None
        if local_only and not _is_cached(name_or_path, revision):
            fix = (
                "Unset HF_HUB_OFFLINE to download it."
                if "HF_HUB_OFFLINE" in unreachable
                else "Connect to download it once."
            )
            raise Sam2LoadError(
                f"Cannot download '{name_or_path}': {unreachable}, the model is not in the local cache and there is "
                f"no local folder of that name. {fix} {OTHER_BASES}"
            )
        if local_only:
            logger.info("%s: loading '%s' from the local cache.", unreachable, name_or_path)
    try:
        family = _family_at(name_or_path, revision, local_only)
        model_cls = family_classes(family, video)[1]
        model = _instantiate(
            family, lambda: model_cls.from_pretrained(name_or_path, revision=revision, local_files_only=local_only)
        )
    except (OSError, ValueError) as err:
        if is_local:
            raise Sam2LoadError(f"Could not load a SAM 2 model from the folder '{name_or_path}': {err}") from err
        raise Sam2LoadError(
            f"Could not load '{name_or_path}' from the Hugging Face Hub (no such repo or revision, or no access: "
            f"{str(err).splitlines()[0]}). {offline_fix()} {OTHER_BASES}"
        ) from err
    processor_cls = Sam3TrackerProcessor if family.name == "sam3_tracker" else Sam2Processor
    try:
        processor = processor_cls.from_pretrained(name_or_path, revision=revision, local_files_only=local_only)
    except (OSError, ValueError):
        logger.warning("No processor found with '%s'; using the standard one for its image size.", name_or_path)
        processor = processor_for_image_size(model_image_size(model), family)
    return model, processor


def _load_meta_checkpoint(path: str, meta_config: str | None, video: bool) -> tuple[torch.nn.Module, Sam2Processor]:
    if meta_config is None:
        raise Sam2LoadError(f"'{path}' is a Meta checkpoint: name its config too (e.g. meta_config='sam2.1_hiera_s').")
    from .meta_checkpoint import load_meta_checkpoint

    model = load_meta_checkpoint(path, meta_config, video=video)
    return model, processor_for_image_size(model_image_size(model))
