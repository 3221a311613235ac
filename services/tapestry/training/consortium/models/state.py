"""The one canonical *model state* that crosses the core, the wire and the disk.

A ``state_dict`` lists a tied tensor (an embedding shared with the output head) once per key,
and a per-key delta would then apply the shared update twice (and safetensors refuses to store
it). :func:`model_state` keeps every tensor once, under the first key that names it (the
embedding's, in the models here); :func:`load_model_state` loads such a state and keeps the
tie. Every state a node trains from, returns, stores, or that the coordinator integrates, is a
model state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.tensors import few_names


def tied_keys(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every state key whose tensor is exactly one listed under
    an earlier key (same memory, dtype, shape and strides): the ties :func:`model_state`
    leaves out. Partly overlapping views are not ties and stay separate keys."""
    first: dict[tuple[object, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in first:
            aliases[name] = first[identity]
        else:
            first[identity] = name
    return aliases


def model_state(model: nn.Module) -> ModelState:
    """The model's canonical state: its ``state_dict`` with each tied tensor once, under its
    first key. Tensors are the model's own (not copies), detached."""
    aliases = tied_keys(model)
    return {name: t for name, t in model.state_dict().items() if name not in aliases}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a canonical state (:func:`model_state`'s keys exactly) into ``model``; tied
    tensors stay one tensor. Raises ``ValueError`` naming missing or unexpected keys."""
    aliases = tied_keys(model)
    expected = [name for name in model.state_dict() if name not in aliases]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        tied = "; keys tied to another are left out" if set(extra) & set(aliases) else ""
        raise ValueError(
            f"state keys differ from the model's: missing {few_names(missing)}, "
            f"unexpected {few_names(extra)}{tied}"
        )
    full = dict(state)
    for alias, canonical in aliases.items():
        full[alias] = state[canonical]  # the same value into the same parameter
    model.load_state_dict(full)


def install_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors the model's own parameters and buffers, without a copy: a
    state the caller hands over (and no longer edits) replaces the model's in place of
    :func:`load_model_state`'s copy into it; the tensors it had are left to whoever else
    holds them. Keys as for :func:`load_model_state`; each tensor must have its
    counterpart's dtype and shape (``ValueError`` otherwise, and the model is unchanged)."""
    aliases = tied_keys(model)
    current = model.state_dict(keep_vars=True)
    expected = [name for name in current if name not in aliases]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"state keys differ from the model's: missing {few_names(missing)}, "
            f"unexpected {few_names(extra)}"
        )
    for name in expected:
        have, given = current[name], state[name]
        if have.dtype != given.dtype or have.shape != given.shape:
            raise ValueError(
                f"{name!r}: the model holds {have.dtype} {tuple(have.shape)}, the state "
                f"{given.dtype} {tuple(given.shape)}"
            )
    for name, tensor in current.items():
        tensor.data = state[aliases.get(name, name)].detach()
