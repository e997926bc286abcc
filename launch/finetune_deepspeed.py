"""Fine-tune a Hugging Face model with dist_lora adapters under DeepSpeed ZeRO.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 launch/finetune_deepspeed.py \
        --config configs/demo_deepspeed.yaml deepspeed.config=configs/deepspeed/zero3.json
    ... launch/finetune_deepspeed.py --config configs/demo_deepspeed.yaml --resume

The recipe YAML is the one launch/finetune.py reads (``parallel`` must be 1 x 1) plus
``deepspeed.config``, a ZeRO JSON from configs/deepspeed/. It is checked before any process
group starts, so a wrong key fails at once on every rank with its name.
"""

from __future__ import annotations

import sys

from dist_lora.recipes.common import launcher_main


def main(argv: list[str] | None = None) -> int:
    return launcher_main(__doc__, argv, "deepspeed_run")


if __name__ == "__main__":
    sys.exit(main())
