"""lora-vlm's LoRA core: a hand-written LoRALinear, forward-hook injection, adapter files."""

__version__ = "0.1.0"

from .adapter_file import (
    AdapterFileError,
    NonFiniteAdapterError,
    base_fingerprint,
    load_adapter,
    read_metadata,
    save_adapter,
)
from .config import LoRAConfig
from .dora import AdapterConflictError, DoRALinear
from .injection import LoRAInjection, inject_lora
from .layer import LoRALinear
from .peft_format import load_peft, save_peft
from .quantized_linear import (
    QUANT_MODES,
    QuantizedLinear,
    frozen_bytes,
    quantizable_linears,
    quantize_model,
    weight_bytes,
)
from .targets import PRESETS, select_targets

__all__ = [
    "PRESETS",
    "QUANT_MODES",
    "AdapterConflictError",
    "AdapterFileError",
    "DoRALinear",
    "LoRAConfig",
    "LoRAInjection",
    "LoRALinear",
    "NonFiniteAdapterError",
    "QuantizedLinear",
    "base_fingerprint",
    "frozen_bytes",
    "inject_lora",
    "load_adapter",
    "load_peft",
    "quantizable_linears",
    "quantize_model",
    "read_metadata",
    "save_adapter",
    "save_peft",
    "select_targets",
    "weight_bytes",
]
