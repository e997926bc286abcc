"""The ``adapter_config.json`` an export writes: the adapter's config as it was written.

A PEFT adapter that went through dist_lora (imported, trained, checkpointed, resharded) comes
back with its config fields as they were, ``target_modules`` and the patterns included, whenever
those fields still say what the exported tensors are: PEFT, applying them to the Hugging Face
model, adapts exactly the exported modules with the exported ranks and alphas and saves exactly
the exported ``modules_to_save``. Where they do not (Megatron module names such as
``linear_qkv``, a ``fused=True`` import whose ranks add up, a PiSSA conversion that doubled some
ranks), the targeting fields name exactly the exported modules, with explicit
``rank_pattern`` / ``alpha_pattern`` entries. A weight-driven initialisation (PiSSA, OLoRA,
LoftQ) is written as ``init_lora_weights=True``: the exported tensors are final, and PEFT would
otherwise rewrite the base weights when it loads them.
"""

from __future__ import annotations

from dist_lora.adapters.targets import pattern_value, saves_module, targets_module
from dist_lora.config.init_names import weight_method
from dist_lora.config.lora import LoraConfig


def describes(config: LoraConfig, modules: dict[str, tuple[int, float]], saved: list[str],
              kinds: dict[str, str]) -> bool:
    """Whether ``config``'s targeting fields, read by PEFT, give exactly ``modules`` (HF name ->
    (r, alpha)) and ``saved`` over the module names of ``kinds`` (HF name -> kind)."""
    for name, kind in kinds.items():
        if saves_module(config, name) != (name in saved):
            return False
        if name in saved:
            continue
        if targets_module(config, name, kind) != (name in modules):
            return False
        if name in modules:
            written = (pattern_value(config.rank_pattern, name, config.r),
                       pattern_value(config.alpha_pattern, name, config.lora_alpha))
            if written != modules[name]:
                return False
    return True


def peft_config(config: LoraConfig, modules: dict[str, tuple[int, float]], saved: list[str],
                base_model: str | None, kinds: dict[str, str], parameters: set[str] = frozenset()) -> dict:
    """The exported ``adapter_config.json`` (see module docstring). ``modules``: every exported
    adapter module -> (r, alpha); ``saved``: the exported ``modules_to_save``; ``kinds``: every
    module of the model PEFT could target -> its kind (at least the exported ones);
    ``parameters``: the routed-expert parameters among ``modules`` (PEFT's ``target_parameters``).
    An adapter on routed experts always names exactly what it exports (``target_modules`` and
    ``target_parameters`` in full)."""
    out = config.to_dict()
    dense = [m for m in modules if m not in parameters]
    if parameters or not describes(config, modules, saved, {**{m: "linear" for m in [*modules, *saved]}, **kinds}):
        out.update(target_modules=sorted(dense), target_parameters=sorted(parameters) or None,
                   exclude_modules=None, layers_to_transform=None,
                   layers_pattern=None, modules_to_save=saved or None,
                   rank_pattern={m: r for m, (r, _) in sorted(modules.items()) if r != config.r},
                   alpha_pattern={m: a for m, (_, a) in sorted(modules.items()) if a != config.lora_alpha})
    if weight_method(config.init_lora_weights) is not None:
        out.update(init_lora_weights=True, loftq_config={})
    if base_model is not None:
        out["base_model_name_or_path"] = base_model
    return out
