"""Where dqcompile meets the libraries users run it in.

- diffusers: the `dqcompile` quantization backend (`quantization_config`, `from_pretrained` of quantized
  folders, on-the-fly round-to-nearest at load), `save_pretrained`.
- lora: low-rank adapters on a quantized model, in float beside the integer GEMMs.
- offload: moving a quantized transformer between devices inside pipelines.
"""

from dqcompile.integrations.diffusers import DQCompileConfig, load_quantized, register, save_pretrained
from dqcompile.integrations.lora import (
    delete_adapters,
    disable_lora,
    enable_lora,
    get_active_adapters,
    load_lora_weights,
    set_adapters,
    unload_lora_weights,
)

__all__ = [
    "DQCompileConfig",
    "delete_adapters",
    "disable_lora",
    "enable_lora",
    "get_active_adapters",
    "load_lora_weights",
    "load_quantized",
    "register",
    "save_pretrained",
    "set_adapters",
    "unload_lora_weights",
]
