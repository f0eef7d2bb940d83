"""The shapes of Llama-architecture causal LMs, from a config alone: what the memory plan needs.

:data:`KNOWN_MODELS` embeds the published configs of the models the paper and the plan's tables use
(no network at run time); :func:`model_shape` reads a known name, a ``config.json`` (or the directory
holding one), a dict or a ``transformers`` config object, and checks each field it uses, naming the
one missing or malformed. Pure arithmetic: no ``transformers``, no ``torch``
(:mod:`fastunlearn.plan.memory_plan` builds on it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KNOWN_MODELS", "LINEARS", "ModelShape", "model_shape"]

# Published configs (config.json of meta-llama/Llama-2-{7b,13b,70b}-hf and meta-llama/Meta-Llama-3-8B).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama2-13b": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama2-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_MODEL_TYPES = ("llama", "mistral")  # Llama-architecture decoders: the layer structure modelled here
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-architecture causal LM (what the plan needs of its config)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    def linears(self) -> dict[str, tuple[int, int]]:
        """``name → (out, in)`` of the seven linear layers of one decoder layer."""
        H, inner = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (q, H),
            "k_proj": (kv, H),
            "v_proj": (kv, H),
            "o_proj": (H, q),
            "gate_proj": (inner, H),
            "up_proj": (inner, H),
            "down_proj": (H, inner),
        }

    def layer_params(self) -> int:
        """Parameters of one decoder layer: the linears, their biases if any, two RMSNorm weights."""
        shapes = self.linears()
        count = sum(out * n_in for out, n_in in shapes.values()) + 2 * self.hidden
        if self.attention_bias:
            count += sum(shapes[n][0] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.mlp_bias:
            count += sum(shapes[n][0] for n in ("gate_proj", "up_proj", "down_proj"))
        return count

    def num_params(self) -> int:
        """Every parameter: embeddings, decoder layers, final norm and (unless tied) the output head."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def linear_params(self, targets: Sequence[str] = LINEARS) -> int:
        """Weights of the target linear layers (what the Fisher estimates cover)."""
        shapes = self.linears()
        return self.layers * sum(shapes[t][0] * shapes[t][1] for t in targets)

    def lora_params(self, rank: int, targets: Sequence[str] = LINEARS) -> int:
        """``n = L·Σ_targets r·(in + out)``: the adapters' ``A`` (``r × in``) and ``B`` (``out × r``)."""
        shapes = self.linears()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _field(config: Mapping[str, Any], name: str, source: str) -> int:
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: config field {name!r} must be a positive integer, got {value!r}")
    return value


def model_shape(config: str | os.PathLike | Mapping[str, Any] | Any) -> ModelShape:
    """A :class:`ModelShape` from a known name (:data:`KNOWN_MODELS`), a ``config.json`` path (or the
    model directory holding one), a dict of its fields, or a ``transformers`` config object.

    Raises ``ValueError`` naming a missing or malformed field, an unsupported ``model_type``, or an
    unknown name; ``FileNotFoundError`` for a path that does not exist.
    """
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str) and config in KNOWN_MODELS:
        name, fields = config, KNOWN_MODELS[config]
    elif isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            known = ", ".join(KNOWN_MODELS)
            raise FileNotFoundError(f"{config!r} is neither a known model ({known}) nor a config.json path")
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a JSON object")
        name = str(path.parent.name or path)
    elif isinstance(config, Mapping):
        fields, name = dict(config), str(config.get("_name_or_path") or config.get("model_type") or "config")
    elif hasattr(config, "to_dict"):
        fields = config.to_dict()
        name = str(fields.get("_name_or_path") or fields.get("model_type") or type(config).__name__)
    else:
        raise TypeError(f"config must be a model name, a path, a dict or a config object, got {config!r}")
    model_type = fields.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{name}: model_type {model_type!r} is not supported; the plan models {list(_MODEL_TYPES)} "
            "(Llama-architecture decoders)"
        )
    for key in _REQUIRED:
        if key not in fields:
            raise ValueError(f"{name}: config has no field {key!r} (needs {list(_REQUIRED)})")
    H, heads = _field(fields, "hidden_size", name), _field(fields, "num_attention_heads", name)
    kv_heads = fields.get("num_key_value_heads") or heads
    head_dim = fields.get("head_dim") or H // heads
    shape = ModelShape(
        name=name,
        model_type=model_type,
        hidden=H,
        intermediate=_field(fields, "intermediate_size", name),
        layers=_field(fields, "num_hidden_layers", name),
        heads=heads,
        kv_heads=_field({"num_key_value_heads": kv_heads}, "num_key_value_heads", name),
        head_dim=_field({"head_dim": head_dim}, "head_dim", name),
        vocab=_field(fields, "vocab_size", name),
        tied=bool(fields.get("tie_word_embeddings", False)),
        attention_bias=bool(fields.get("attention_bias", False)),
        mlp_bias=bool(fields.get("mlp_bias", False)),
    )
    if heads % shape.kv_heads:
        raise ValueError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
    return shape
