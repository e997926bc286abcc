"""Checks that misbehave on purpose, for the harness's own tests (not collected by pytest)."""

import os
import time

import torch

from dist_lora.parallel.collectives import all_reduce_
from dist_lora.testing import check


@check("tp1")
def passes(ctx):
    all_reduce_(torch.ones(1))


@check("tp1")
def fails_on_rank_1(ctx):
    assert ctx.groups.rank != 1, "rank 1 disagrees"


@check("tp2")
def rank_1_hangs(ctx):
    if ctx.groups.rank == 1:
        time.sleep(3600)
    all_reduce_(torch.ones(1))


@check("tp2")
def rank_1_dies(ctx):
    if ctx.groups.rank == 1:
        os._exit(3)
    all_reduce_(torch.ones(1))
