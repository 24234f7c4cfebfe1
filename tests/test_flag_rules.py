"""A flag a command accepts acts or is refused: given where it would do nothing (another protocol, mode or prompt, an
embedding cache that is off), it ends the command with one `error:` line naming it and why, before anything loads;
left at its default, it is never refused."""

from __future__ import annotations

import pytest

from sam2_peft.cli import main

EVAL = ["eval", "--model", "tiny-random", "--data", "no-such-data"]
SEGMENT = ["segment-all", "no-such-images", "no-such-out", "--model", "tiny-random"]


def refusal(capsys, argv: list[str]) -> str:
    """The last line a command line ends with as a usage error (status 2), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--protocol", "automatic", "--batch-size", "8"], "--batch-size applies to --protocol prompted only"),
        (["--protocol", "interactive", "--prompt", "point"], "--prompt applies to --protocol prompted or video only"),
        (["--protocol", "video", "--batch-size", "8"], "--batch-size applies to --protocol prompted only"),
        (["--protocol", "video", "--mask-type", "binary"], "--mask-type applies to image data only"),
        (["--protocol", "video", "--max-images", "3"], "--max-images applies to image data only"),
        (["--protocol", "video", "--dtype", "bfloat16"], "--dtype applies to image protocols only"),
        (["--points-per-side", "4"], "--points-per-side applies to --protocol automatic only"),
        (["--protocol", "interactive", "--min-area", "5"], "--min-area applies to --protocol automatic only"),
        (["--protocol", "automatic", "--max-clicks", "3"], "--max-clicks applies to --protocol interactive only"),
        (["--foreground-adapter", "x"], "--foreground-adapter applies to --protocol automatic only"),
        (["--protocol", "interactive", "--foreground-adapter", "x"], "--foreground-adapter applies to --protocol auto"),
        (["--protocol", "automatic", "--cells-per-side", "8"], "--cells-per-side applies to the specialist-guided"),
        (["--protocol", "automatic", "--clip-to-foreground"], "--clip-to-foreground applies to the specialist-guided"),
        (["--protocol", "automatic", "--crop-overlap-ratio", "0.2"], "--crop-overlap-ratio applies with --crop-n-lay"),
        (["--base-model", "tiny-random"], "--base-model applies with --adapter only"),
        (["--token", "hf_x"], "--token applies with --adapter only"),
    ],
)
def test_eval_refuses_a_flag_its_protocol_does_not_use(capsys, flags, message):
    assert refusal(capsys, [*EVAL, *flags]).startswith(f"sam2-peft eval: error: {message}")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--foreground-adapter", "x", "--points-per-side", "8"], "--points-per-side applies to the grid mode only"),
        (["--foreground-adapter", "x", "--crop-n-layers", "1"], "--crop-n-layers applies to the grid mode only"),
        (["--cells-per-side", "8"], "--cells-per-side applies to the specialist-guided mode only"),
        (["--crop-n-points-downscale-factor", "2"], "--crop-n-points-downscale-factor applies with --crop-n-layers"),
    ],
)
def test_segment_all_refuses_the_other_modes_flags(capsys, flags, message):
    assert refusal(capsys, [*SEGMENT, *flags]).startswith(f"sam2-peft segment-all: error: {message}")


def test_predict_refuses_adapter_flags_without_an_adapter(capsys):
    line = refusal(capsys, ["predict", "no-such-images", "no-such-out", "--model", "tiny-random", "--base-model", "b"])
    assert line.startswith("sam2-peft predict: error: --base-model applies with --adapter only")


@pytest.mark.parametrize(
    "argv",
    [
        [
            *EVAL,
            "--protocol",
            "automatic",
            "--points-per-side",
            "4",
            "--crop-n-layers",
            "1",
            "--crop-overlap-ratio",
            "0.2",
        ],
        [
            *EVAL,
            "--protocol",
            "automatic",
            "--foreground-adapter",
            "x",
            "--cells-per-side",
            "8",
            "--points-per-side",
            "4",
        ],
        [*EVAL, "--protocol", "interactive", "--max-clicks", "3"],
        [*EVAL, "--batch-size", "1", "--prompt", "point"],
        [*SEGMENT, "--foreground-adapter", "x", "--cells-per-side", "8", "--clip-to-foreground"],
    ],
)
def test_flags_that_act_and_defaults_pass(capsys, argv):
    """Flags that act, and those left at their defaults, pass: the command goes on to its missing data."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert str(exit_info.value.code).startswith("error:") and "no-such-" in str(exit_info.value.code)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ptsam", "--box-jitter", "0.2"], "--box-jitter applies to box prompts only"),
        (["ptsam", "--num-points", "3"], "--num-positive-points applies to point prompts only"),
        (["lora", "--prompt", "point", "--max-box-jitter-px", "3"], "--max-box-jitter-px applies to box prompts only"),
        (["video", "--prompt", "box", "--num-negative-points", "1"], "--num-negative-points applies to point prompts"),
        (["ptsam_encoder", "--cache-dir", "f"], "--cache-dir applies to the embedding cache only, which is off: --enc"),
        (["ptsam", "--encoder-prompts", "2", "--prompt-chunk", "2"], "--prompt-chunk applies to the embedding cache"),
        (["pretrain", "--cache-views", "2"], "--cache-views applies to the embedding cache only, which is off: pre-t"),
        (["partial", "--component-lr", "vision_encoder=1e-6", "--cache-dtype", "bfloat16"], "--cache-dtype applies"),
        (["lora", "--targets", "decoder+encoder", "--cache-memory-gb", "1"], "--cache-memory-gb applies to the embed"),
        (["lora", "--no-cache-embeddings", "--cache-dir", "f"], "--cache-dir applies to the embedding cache only, whi"),
        (["lora", "--no-augment", "--blur", "0.3"], "--blur does nothing with --no-augment"),
        (["lora", "--no-augment", "--cache-views", "2"], "--cache-views applies to augmented training only"),
        (["lora", "--shuffle-buffer", "8"], "--shuffle-buffer applies with --streaming only"),
        (["lora", "--hub-private"], "--hub-private applies with --push-to-hub only"),
        (["video", "--hub-revision", "dev"], "--hub-revision applies with --push-to-hub only"),
        (["lora", "--target-regex", "mask_decoder.*q_proj", "--targets", "decoder"], "--targets does nothing with --t"),
    ],
)
def test_recipes_refuse_a_flag_that_does_nothing_in_the_run(capsys, argv, message):
    """(Missing data: without the refusal, the run would stop there, before the model loads.)"""
    line = refusal(capsys, ["train", *argv, "--data", "no-such-data"])
    assert line.startswith(f"sam2-peft train {argv[0].split('_')[0]}: error: {message}")


@pytest.mark.parametrize(
    "argv",
    [
        ["ptsam_encoder"],  # the alias's encoder prompts turn the cache off; its flags, left alone, stay silent
        ["pretrain", "--prompt", "box", "--box-jitter", "0.1"],
        ["ptsam", "--prompt", "point", "--num-points", "2", "--cache-dir", "f", "--prompt-chunk", "2"],
        ["partial", "--component-lr", "mask_decoder=1e-4", "--cache-views", "2", "--blur", "0.3"],
        ["lora", "--streaming", "--shuffle-buffer", "8", "--max-steps", "2", "--push-to-hub", "o/r", "--hub-private"],
    ],
)
def test_recipe_flags_that_act_and_defaults_pass(argv):
    """The run goes on to its missing data (checked before the model loads)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv, "--data", "no-such-data"])
    assert str(exit_info.value.code).startswith("error: ") and "no-such-data" in str(exit_info.value.code)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "2"], "--replicas applies to --engine ray only"),
        (["--max-adapters-per-replica", "2"], "--max-adapters-per-replica applies to --engine ray only"),
        (["--engine", "ray", "--max-replicas", "4", "--replicas", "2"], "--replicas is a fixed count"),
        (["--engine", "ray", "--min-replicas", "0"], "--min-replicas applies with --max-replicas (autoscaling) only"),
        (["--engine", "ray", "--adapter-root", "adapters"], "--adapter-root does not apply to --engine ray"),
        (["--engine", "ray", "--max-header-kb", "8"], "--max-header-kb does not apply to --engine ray"),
        (["--engine", "ray", "--max-adapters", "4"], "--max-adapters does not apply to --engine ray"),
        (
            ["--engine", "ray", "--load-on-use", "--allow-hub-repo", "org/*"],
            "--load-on-use does not apply to --engine ray",
        ),
        (["--engine", "ray", "--token", "t"], "--token with --engine ray applies with --token-all only"),
    ],
)
def test_serve_refuses_the_other_engines_flags(capsys, flags, message):
    assert refusal(capsys, ["serve", "--model", "tiny-random", *flags]).startswith(f"sam2-peft serve: error: {message}")


def test_a_repeatable_flag_counts_as_given(capsys):
    """`--adapter` extends a list: given with a flag the rules refuse, the refusal still names the right flag."""
    argv = ["serve", "--model", "tiny-random", "--adapter", "a=dir", "--replicas", "2"]
    assert refusal(capsys, argv).endswith("error: --replicas applies to --engine ray only")
