"""One decoder block at a time, built from the config and filled from the checkpoint.

transformers 5.19 facts this relies on (``shared/notes/transformers-block-facts.md``):
``attn_implementation`` must be set on the config (unset means bidirectional eager attention);
the rotary embedding lives at model level and must be built off the meta device; sliding-window
layers need an explicit mask (sdpa's ``is_causal`` covers only full attention); a block returns a
Tensor, not a tuple; ``load_state_dict(assign=True)`` keeps the tensor's dtype.
"""

from __future__ import annotations

import logging
from functools import cached_property

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..sparse.format import unpack_state_dict
from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class StreamedDecoder:
    """A causal LM read block by block: embeddings, ``num_layers`` blocks, final norm and head.

    ``dtype`` is the compute dtype (default: the checkpoint's stored dtype); blocks are moved to
    ``device`` one at a time. Hidden states keep the compute dtype between blocks, as in the full model.
    """

    def __init__(self, path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
        self.ckpt = Checkpoint(path)
        model_type = self.ckpt.config_dict().get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"{self.ckpt.path}: unsupported architecture model_type={model_type!r}; "
                f"supported are {', '.join(SUPPORTED_MODEL_TYPES)} (Llama, Mistral, Qwen2)"
            )
        # never run code from the checkpoint (auto_map): only the built-in classes of the supported types
        try:
            self.config = AutoConfig.from_pretrained(self.ckpt.path, attn_implementation="sdpa",
                                                     trust_remote_code=False)
        except (ValueError, TypeError, KeyError, StrictDataclassError) as err:
            raise ValueError(f"{self.ckpt.path / 'config.json'}: invalid {model_type} config: {err}") from None
        self.device = torch.device(device)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        self._layer_cls = type(skeleton.model.layers[0])
        self._norm_cls = type(skeleton.model.norm)
        self.rotary = type(skeleton.model.rotary_emb)(self.config).to(self.device)
        del skeleton
        keys = self.ckpt.weight_map
        self.prefix = "model." if "model.embed_tokens.weight" in keys else ""
        self.embed_key = f"{self.prefix}embed_tokens.weight"
        if self.embed_key not in keys:
            raise ValueError(f"{self.ckpt.path}: no {self.embed_key} tensor; is this a decoder-only LM?")
        self.num_layers = int(self.config.num_hidden_layers)
        self.dtype = parse_dtype(dtype) or self.stored_dtype
        self._masks: dict[tuple, torch.Tensor | None] = {}

    @cached_property
    def stored_dtype(self) -> torch.dtype:
        code, _ = self.ckpt.header(self.embed_key)
        if code not in _STORED_DTYPES:
            raise ValueError(f"{self.ckpt.path}: unsupported stored dtype {code} for {self.embed_key}")
        return _STORED_DTYPES[code]

    def block_prefix(self, i: int) -> str:
        return f"{self.prefix}layers.{i}."  # trailing dot: "layers.1" would also match layers 10-19

    def non_block_keys(self) -> list[str]:
        layers = f"{self.prefix}layers."
        return [k for k in self.ckpt.weight_map if not k.startswith(layers)]

    def load_block(self, i: int) -> nn.Module:
        state = unpack_state_dict(self.ckpt.read_prefix(self.block_prefix(i)))
        state = {k: v.to(device=self.device, dtype=self.dtype) for k, v in state.items()}
        with torch.device("meta"):
            layer = self._layer_cls(self.config, layer_idx=i)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{self.ckpt.path}: block {i} does not match its config: {err}") from err
        for p in layer.parameters():
            p.requires_grad_(False)
        return layer.eval()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.ckpt.read([self.embed_key])[self.embed_key].to(self.device, self.dtype)
        return F.embedding(input_ids.to(self.device), weight)

    def _is_sliding(self, i: int) -> bool:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return layer_types[i] == "sliding_attention"
        return getattr(self.config, "sliding_window", None) is not None

    def run_block(self, layer: nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output for full (unpadded) windows ``hidden`` [B, S, H]."""
        batch, seqlen = hidden.shape[:2]
        pos = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
        sliding = self._is_sliding(i)
        key = (batch, seqlen, sliding, hidden.dtype, hidden.device)
        if key not in self._masks:
            fn = create_sliding_window_causal_mask if sliding else create_causal_mask
            self._masks[key] = fn(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        cos_sin = self.rotary(hidden, pos)
        out = layer(hidden, attention_mask=self._masks[key], position_ids=pos,
                    position_embeddings=cos_sin, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def head(self) -> tuple[nn.Module, torch.Tensor]:
        """The final norm and the output projection (the embedding when the model is tied)."""
        head_key = "lm_head.weight" if "lm_head.weight" in self.ckpt.weight_map else self.embed_key
        t = self.ckpt.read([f"{self.prefix}norm.weight", head_key])
        norm = self._norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.load_state_dict({"weight": t[f"{self.prefix}norm.weight"].to(self.device, self.dtype)}, assign=True)
        return norm, t[head_key].to(self.device, self.dtype)


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The block's linears in call order (q, k, v, o, gate, up, down for the supported models)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
