"""Adapter checkpoints and formats: PEFT key naming (``peft_names``) and whole-adapter state dicts
(``state_dict``), sharded checkpoints with resharding (``sharded``, ``reshard``, ``entries``),
training state (``training_state``), PEFT export / import (``peft_format``, ``peft_to_sharded``),
merged releases (``merge_release``), offline re-layout (``offline_reshard``), the adapter-method
table (``methods``) and atomic directory writes (``atomic``). The public names are exported by
:mod:`dist_lora`."""
