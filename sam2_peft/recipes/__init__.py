"""The training recipes, one module each: a dataclass of the method's flags (beside the shared ones in
`recipes.arguments`) and `main()`. Run one with `sam2-peft train NAME`, `accelerate launch -m sam2_peft.recipes.NAME`
or, from a clone, `accelerate launch recipes/NAME.py`."""

RECIPES = {
    "lora": "LoRA on the mask decoder (or any preset), box/point prompts",
    "ptsam": "PTSAM learned prompt tokens, prompt-free by default (--encoder-prompts N adds encoder prompts)",
    "partial": "partial fine-tuning: whole components, each with its own learning rate",
    "video": "LoRA on SAM 2 video (decoder and memory), trained on clips",
    "pretrain": "every parameter, from a config, on synthetic scenes by default",
}
"""Recipe name -> what it trains (module `sam2_peft.recipes.<name>`)."""

ALIASES = {
    "lora_decoder": ("lora", {}),
    "ptsam_decoder": ("ptsam", {}),
    "ptsam_encoder": ("ptsam", {"encoder_prompts": 8}),
    "partial_finetune": ("partial", {}),
    "video_lora": ("video", {}),
}
"""Names of the first release's recipe scripts -> (recipe, its defaults there)."""
