"""The one path that adds an adapter of any method (LoRA, AdaLoRA, a weighted combination).

Adding is collective over the whole job (every rank calls it with the same arguments):

1. **agree** - the adapter's name and config are equal on every rank, else every rank raises;
2. **plan** - each rank validates what it holds and lists the build steps, without touching the
   model; an error on any rank is raised on every rank; the job as a whole must match something
   (under pipeline parallelism a stage may match nothing);
3. **build** - the steps run in order, every change recorded in a
   :class:`~dist_lora.adapters.journal.Journal`; before a step that communicates, its group
   agrees that no member has failed so far, so no rank waits in a collective that a failed peer
   never enters;
4. **commit** - the registry takes the config (the first adapter becomes active) and exactly the
   active adapters become trainable.

If anything fails on any rank, every rank rolls its journal back (modules, factors, base
weights, trainable flags and registry exactly as before the call) and raises one ``RankError``
naming the failing ranks and their errors (with one rank, the original exception).

A method supplies only its planner: ``plan(model, config, adapter_name, seed) -> Plan``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from dist_lora.adapters.journal import Journal
from dist_lora.adapters.model import view
from dist_lora.adapters.registry import existing, registry
from dist_lora.adapters.targets import leaf_names
from dist_lora.adapters.trainable import refresh
from dist_lora.config.lora import LoraConfig
from dist_lora.parallel.agreement import any_rank, check_same_on_all_ranks, on_every_rank, raise_if_any
from dist_lora.parallel.collectives import all_gather_object

_VALID_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Step:
    """One build step: ``run(journal)`` changes the model only through the journal. ``group``:
    the process group it communicates over (``None``: it does not communicate)."""

    run: Callable[[Journal], None]
    group: Any = None


@dataclass
class Plan:
    """What a method's planner found on this rank: the build steps, the Hugging Face names of the
    modules it adapts here, and the name tuples of its ``modules_to_save`` here."""

    steps: list[Step] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    saved: list[tuple[str, ...]] = field(default_factory=list)


Planner = Callable[[nn.Module, LoraConfig, str, int], Plan]


class _PeerFailed(Exception):
    """This rank stopped building because a member of a step's group failed."""


def check_new_name(model: nn.Module, adapter_name: str) -> None:
    """A new adapter needs a valid name that the model does not use yet."""
    if not isinstance(adapter_name, str) or not _VALID_NAME.match(adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    configs = existing(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {sorted(configs)}")


def add(model: nn.Module, config: LoraConfig, adapter_name: str, planner: Planner, seed: int | None = None,
        what: str = "adding adapter") -> nn.Module:
    """Add ``adapter_name`` with ``config``, planned and built by ``planner`` (module docstring)."""
    what = f"{what} {adapter_name!r}"
    config = config.copy()
    check_same_on_all_ranks((adapter_name, config.to_dict()), what=f"adapter {adapter_name!r} config")
    config.validate()
    seed = view(model).seed(seed)
    plan = Plan()
    with on_every_rank(what):
        check_new_name(model, adapter_name)
        plan = planner(model, config, adapter_name, seed)
    _check_matches_somewhere(model, config, plan)
    journal = Journal(model)
    error = _build(plan.steps, journal)
    if error is None:
        try:
            reg = registry(model, create=True)
            reg.configs[adapter_name] = config
            if not reg.active:
                reg.active = [adapter_name]
            refresh(model)
        except Exception as err:  # noqa: BLE001 - rolled back and raised on every rank below
            error = err
    try:
        raise_if_any(None if isinstance(error, _PeerFailed) else error, what=what)
    except BaseException:
        journal.rollback(refresh)
        raise
    return model


def _build(steps: list[Step], journal: Journal) -> BaseException | None:
    """Run ``steps``; the first error (or ``_PeerFailed``), with every later step skipped but its
    agreement point kept, so every member of a group passes the same points."""
    error: BaseException | None = None
    for step in steps:
        if step.group is not None and any_rank(error is not None, step.group) and error is None:
            error = _PeerFailed()
        if error is None:
            try:
                step.run(journal)
            except Exception as err:  # noqa: BLE001 - agreed on and raised on every rank by add()
                error = err
    return error


def _check_matches_somewhere(model: nn.Module, config: LoraConfig, plan: Plan) -> None:
    """Collective: under pipeline parallelism a stage may match nothing; the job as a whole must."""
    found = all_gather_object((plan.targets, plan.saved))
    if not any(targets for targets, _ in found):
        raise ValueError(f"target_modules={config.target_modules!r} matched no module; modules that "
                         f"could match: {', '.join(leaf_names(model))}")
    names = [n for _, groups in found for group in groups for n in group]
    for wanted in config.modules_to_save or []:
        if not any(re.match(rf"(^|.*\.){wanted}$", n) for n in names):
            raise ValueError(f"modules_to_save entry {wanted!r} matched no module; modules that could "
                             f"match: {', '.join(leaf_names(model))}")
