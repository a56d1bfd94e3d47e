"""Optimizer construction and its checkpointed state, keyed by parameter name.

A checkpoint stores the optimizer's ``state_dict`` (state keyed by position) and, beside it, the name
of the parameter at each position (``optimizer_names``). Loading maps the saved state onto today's
optimizer by name, so a run resumes even when the set of trainable parameters changed between versions
(a fixed projection no longer held by the optimizer, a new adapter); checkpoints written before names
were stored are read with the grouping that version used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visiontrain.engine.checkpoint import CheckpointError


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of rank ≥ 2 only: never on biases or norm scales. Parameters built
    without ``requires_grad`` (fixed by design) are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Any, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over ``groups`` (trainable parameters only; empty groups dropped); each
    group remembers ``initial_lr`` and ``warmup_start`` for the schedule."""
    kept = []
    for g in groups:
        g = dict(g, params=[p for p in g["params"] if p.requires_grad])
        if g["params"]:
            g.setdefault("warmup_start", cfg.warmup_start)
            kept.append(g)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(kept, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(kept, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


def param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The name of each parameter the optimizer holds, group by group (positions of its state dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def legacy_param_names(model: nn.Module) -> list[list[str]]:
    """What checkpoints without ``optimizer_names`` (before the redesign) held: every parameter, rank ≥ 2
    first, then the rest — :func:`default_param_groups` before fixed parameters were left out."""
    decay = [n for n, p in model.named_parameters() if p.ndim >= 2]
    return [decay, [n for n, p in model.named_parameters() if p.ndim < 2]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict,
                         saved_names: list[list[str]] | None, source: str) -> None:
    """Load ``saved`` (an optimizer ``state_dict``) into ``optimizer``, matching parameters by name.

    A parameter the saved state has no entry for starts fresh; saved entries of parameters the optimizer
    no longer holds are dropped. Hyper-parameters of each group come from the checkpoint."""
    names_now = param_names(optimizer, model)
    saved_names = saved_names if saved_names is not None else legacy_param_names(model)
    groups = saved["param_groups"]
    if [len(n) for n in saved_names] != [len(g["params"]) for g in groups]:
        raise CheckpointError(f"{source}: its optimizer state has groups of {[len(g['params']) for g in groups]} "
                              f"parameters, which its parameter names do not describe; resume with a fresh "
                              f"optimizer by loading weights={source} instead")
    if len(groups) != len(names_now):
        raise CheckpointError(f"{source}: the optimizer had {len(groups)} parameter groups, this run has "
                              f"{len(names_now)}; start from weights={source} instead")
    by_name = {n: saved["state"][i] for g, ns in zip(groups, saved_names) for i, n in zip(g["params"], ns)
               if i in saved["state"]}
    state, index, out_groups = {}, 0, []
    for g, ns in zip(groups, names_now):
        ids = list(range(index, index + len(ns)))
        index += len(ns)
        state.update({i: by_name[n] for i, n in zip(ids, ns) if n in by_name})
        out_groups.append({**g, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": out_groups})
