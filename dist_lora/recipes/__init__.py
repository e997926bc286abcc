"""The fine-tuning recipe: typed YAML config (``config``), data (``data``), the adapter method of
a recipe (``adapter``), the shared loop pieces (``common``) and the two runners (``finetune``:
Megatron-Core; ``deepspeed_run``: DeepSpeed ZeRO)."""
