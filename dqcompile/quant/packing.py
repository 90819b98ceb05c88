"""int4 packing, two codes to a byte (docs/CONTRACTS.md, "int4 packing").

Byte ``j`` of a row holds column ``2j`` in its low nibble and column ``2j + 1`` in its high nibble, each as
4-bit two's complement: ``[..., K]`` int8 codes in ``[-8, 7]`` <-> ``[..., K/2]`` uint8.
"""

import torch
from torch import Tensor

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 codes ``[..., K]`` in ``[-8, 7]`` (K even) into uint8 ``[..., K/2]``."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 needs int8 codes, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(q.shape)}")
    if q.numel() > 0 and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4 needs codes in [{INT4_MIN}, {INT4_MAX}], got values in [{int(q.min())}, {int(q.max())}]"
        )
    # & 0xF on a wider int keeps the low 4 bits of the two's complement value: the 4-bit two's complement.
    nibbles = q.to(torch.int16) & 0xF
    low, high = nibbles[..., 0::2], nibbles[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Unpack uint8 ``[..., K/2]`` into int8 codes ``[..., K]`` in ``[-8, 7]`` (inverse of ``pack_int4``)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs uint8 packed codes, got {packed.dtype}")
    wide = packed.to(torch.int16)
    low, high = wide & 0xF, wide >> 4
    # Sign-extend a 4-bit two's complement nibble v: flipping bit 3 then subtracting 8 maps 0..7 -> 0..7
    # and 8..15 -> -8..-1.
    codes = torch.stack(((low ^ 8) - 8, (high ^ 8) - 8), dim=-1)
    return codes.flatten(-2).to(torch.int8)
