"""Fine-tune a Megatron model with dist_lora adapters.

    torchrun --standalone --nproc_per_node 2 launch/finetune.py --config configs/demo.yaml
    torchrun ... launch/finetune.py --config configs/demo.yaml train.steps=200 --resume

The config (YAML, see ``dist_lora/recipes/config.py``) is read and checked before any process
group starts, so a wrong key fails at once on every rank with its name.
"""

from __future__ import annotations

import sys

from dist_lora.recipes.common import launcher_main


def main(argv: list[str] | None = None) -> int:
    return launcher_main(__doc__, argv, "finetune")


if __name__ == "__main__":
    sys.exit(main())
