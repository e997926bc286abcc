"""Fine-tune a Megatron model with dist_lora adapters.

    torchrun --standalone --nproc_per_node 2 launch/finetune.py --config configs/demo.yaml
    torchrun ... launch/finetune.py --config configs/demo.yaml train.steps=200 --resume

The config (YAML, see ``dist_lora/recipes/config.py``) is read and checked before any process
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
    except (OSError, ValueError) as err:
        print(f"finetune: config error: {err}", file=sys.stderr)
        return 2
    from dist_lora.recipes.finetune import run

    return run(config, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
