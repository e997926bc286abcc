"""Fine-tune a Hugging Face model with dist_lora adapters under DeepSpeed ZeRO.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 launch/finetune_deepspeed.py \
        --config configs/demo_deepspeed.yaml deepspeed.config=configs/deepspeed/zero3.json
    ... launch/finetune_deepspeed.py --config configs/demo_deepspeed.yaml --resume

The recipe YAML is the one launch/finetune.py reads (``parallel`` must be 1 x 1) plus
``deepspeed.config``, a ZeRO JSON from configs/deepspeed/. It is checked before any process
group starts, so a wrong key fails at once on every rank with its name.
"""

from __future__ import annotations

import argparse
import sys

from dist_lora.recipes.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        from dist_lora.recipes.deepspeed_run import engine_config, run

        if config.deepspeed.config is None:
            raise ValueError("deepspeed.config is not set: add deepspeed.config=configs/deepspeed/zero3.json")
        engine_config(config)
    except (OSError, ValueError) as err:
        print(f"finetune_deepspeed: config error: {err}", file=sys.stderr)
        return 2
    return run(config, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
