"""Initialisation of LoRA factors, seeded or weight-driven, behind one table (``methods``).

Seeded (``seeded``): A / B drawn from a generator equal on every rank. Weight-driven (PiSSA,
OLoRA, LoftQ; one file each): computed on the *global* weight from local shards with small
collectives over the TP group, no rank ever holding the full weight; ``weight`` reads a slot's
shard, runs the method and writes A, B and the new base rows.
"""
