"""The ``transformers`` config a plan is made from: a model directory, a ``config.json``, a cached Hub id,
a config object, or a well-known model (its published fields, shipped here: no download)."""

from __future__ import annotations

import json
import os
from typing import Any

_LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
_GQA = {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf, meta-llama/Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1
    "llama2-7b": {**_LLAMA, "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096},
    "llama3-8b": {**_GQA, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "mistral-7b": {**_GQA, "model_type": "mistral", "vocab_size": 32000, "sliding_window": 4096},
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": {
        **{"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28},
        **{"num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1e6},
    },
    # microsoft/phi-1_5, EleutherAI/gpt-neo-2.7B
    "phi-1.5": {
        **{"model_type": "phi", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24},
        **{"num_attention_heads": 32, "vocab_size": 51200, "partial_rotary_factor": 0.5},
    },
    "gpt-neo-2.7b": {
        **{"model_type": "gpt_neo", "hidden_size": 2560, "num_layers": 32, "num_heads": 20},
        **{"vocab_size": 50257, "attention_types": [[["global", "local"], 16]], "window_size": 256},
    },
}


def model_config(source: Any, *, trust_remote_code: bool = False) -> Any:
    """The config of ``source`` (module docstring; a peft adapter: its base model's, a dict: its fields);
    a one-line ``ValueError`` for a source it cannot read."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        return _from_fields(dict(source), "the config")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"a model configuration is a path, a name or a config object, not {type(source).__name__}"
        )
    name = os.fspath(source)
    if name in KNOWN_MODELS:
        return _from_fields(dict(KNOWN_MODELS[name]), name)
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as handle:
            try:
                fields = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{name}: not JSON ({err})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{name}: a config.json holds a JSON object")
        return _from_fields(fields, name)
    adapter = os.path.join(name, "adapter_config.json")
    if os.path.isfile(adapter) and not os.path.isfile(os.path.join(name, "config.json")):
        with open(adapter, encoding="utf-8") as handle:  # a peft adapter: its base model's config
            base = json.load(handle).get("base_model_name_or_path")
        return model_config(base or name, trust_remote_code=trust_remote_code)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"model directory {name!r} holds no config.json")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError:
        raise ValueError(
            f"{name!r} is not a model directory, a config.json, a Hub id in the local cache nor a known "
            f"model ({', '.join(KNOWN_MODELS)})"
        ) from None
    except Exception as err:  # transformers' validators raise their own types
        raise ValueError(f"{name}: transformers cannot read its config ({first_line(err)})") from None


def _from_fields(fields: dict[str, Any], name: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{name}: model_type {model_type!r} is not one transformers knows")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # transformers' validators raise their own types
        raise ValueError(
            f"{name}: transformers cannot build a {model_type!r} config ({first_line(err)})"
        ) from None


def first_line(err: BaseException) -> str:
    """The last line of ``err``'s message (wrappers put the cause last), at most 200 characters."""
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (text[-1][:200] if text else "") or type(err).__name__
