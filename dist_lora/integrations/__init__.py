"""Seams to optional or external backends (megatron-core, DeepSpeed, bitsandbytes, MPI).

Each backend is imported in exactly one module here; nothing else in dist_lora imports them.
"""
