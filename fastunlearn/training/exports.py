"""What a finished run writes: the adapter (LoRA / FILA) or the whole model, and the merged model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from fastunlearn._io import write_dir
from fastunlearn.engines import distributed
from fastunlearn.models.naming import unwrap_model


def collect_outputs(
    model: nn.Module, *, init: str, merge: bool, state_dict: dict | None = None
) -> dict[str, Any]:
    """What :func:`save_outputs` writes, read by every rank (a collective under ZeRO-3) and kept by the
    main one. ``state_dict``: the state an engine gathered itself (FSDP)."""
    from fastunlearn.engines.sharded import gathered_state_dict, is_partitioned

    keep = distributed.is_main()
    if init == "full":  # whole weights are saved from the model itself, without a copy in memory
        partitioned = any(is_partitioned(p) for p in model.parameters())
        return {"model": gathered_state_dict(unwrap_model(model), keep=keep) if partitioned else None}
    if state_dict is not None and not keep:  # gathered already, into the main process alone
        return {}
    from fastunlearn.fisher import adapter_export, merged_state_dict

    collected: dict[str, Any] = {"adapter": adapter_export(model, state_dict=state_dict)}
    if merge:
        collected["merged"] = merged_state_dict(model, keep=keep, state_dict=state_dict)
    return collected


def save_outputs(
    model: nn.Module, tokenizer: Any, collected: dict[str, Any], build: str, *, init: str
) -> dict[str, str]:
    """Write the collected outputs into ``build``; the paths written, by kind."""
    if init == "full":

        def save_full(tmp: str) -> None:
            unwrap_model(model).save_pretrained(tmp, state_dict=collected["model"])
            tokenizer.save_pretrained(tmp)

        return {"model": write_dir(os.path.join(build, "model"), save_full)}
    from fastunlearn.fisher import save_merged, write_adapter

    adapter = write_adapter(collected["adapter"], os.path.join(build, "adapter"), overwrite=True)
    written = {"adapter": os.fspath(adapter)}
    if "merged" in collected:

        def save_merged_model(tmp: str) -> None:
            save_merged(model, tmp, overwrite=True, state_dict=collected["merged"])
            tokenizer.save_pretrained(tmp)

        written["merged"] = write_dir(os.path.join(build, "merged"), save_merged_model)
    return written
