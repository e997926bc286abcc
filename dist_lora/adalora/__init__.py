"""AdaLoRA (https://openreview.net/forum?id=lq62uWRJjiY) on any TP / SP / PP / DP layout, as PEFT
does it on one device: SVD-form adapters, orthogonality penalty, and one global rank budget."""

from dist_lora.adalora.allocator import update_and_allocate
from dist_lora.adalora.apply import apply_adalora
from dist_lora.adalora.config import AdaLoraConfig
from dist_lora.adalora.export import export_adalora
from dist_lora.adalora.orth import orth_reg_loss
from dist_lora.adalora.shrink import shrink_to_rank_pattern

__all__ = ["AdaLoraConfig", "apply_adalora", "export_adalora", "orth_reg_loss", "shrink_to_rank_pattern",
           "update_and_allocate"]
