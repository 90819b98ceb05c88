"""int4 packing, two codes to a byte (docs/CONTRACTS.md, "int4 packing").

``[..., K]`` int8 codes in ``[-8, 7]`` <-> ``[..., K/2]`` uint8, each code as 4-bit two's complement.
The layout is chosen for the GEMM kernel (dqcompile/backends/triton/gemm.py), which unpacks a weight
tile with one shift and one mask per nibble and no interleave:

    the K columns of a row are cut into chunks of CHUNK = 128 consecutive columns (the last chunk may be
    narrower: any even width w); chunk c occupies bytes [c * CHUNK / 2, c * CHUNK / 2 + w / 2), and
    byte i of the chunk holds column i of the chunk in its low nibble and column w / 2 + i in its high
    nibble.

So the low nibbles of a chunk's bytes are its first half of columns, in order, and the high nibbles its
second half: a kernel that loads the chunk's w / 2 bytes sign-extends ``(b << 4) >> 4`` into the first
half and ``b >> 4`` into the second, and multiplies each against the matching half of the activation
tile. Only the position of codes changed from the previous layout (column 2j low, 2j + 1 high); the
codes themselves, and so every model output, are the same.
"""

import torch
from torch import Tensor

INT4_MIN, INT4_MAX = -8, 7
# Columns per packed chunk: one K block of the GEMM kernel (64 bytes of a weight row).
CHUNK = 128


def _check_width(k: int, shape: tuple[int, ...]) -> None:
    if k % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {shape}")


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 codes ``[..., K]`` in ``[-8, 7]`` (K even) into uint8 ``[..., K/2]`` (layout above)."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 needs int8 codes, got {q.dtype}")
    if q.dim() == 0:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(q.shape)}")
    _check_width(q.shape[-1], tuple(q.shape))
    if q.numel() > 0 and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4 needs codes in [{INT4_MIN}, {INT4_MAX}], got values in [{int(q.min())}, {int(q.max())}]"
        )
    # & 0xF on a wider int keeps the low 4 bits of the two's complement value: the 4-bit two's complement.
    nibbles = q.to(torch.int16) & 0xF
    return _pack_nibbles(nibbles).to(torch.uint8)


def _pack_nibbles(nibbles: Tensor) -> Tensor:
    """int16 nibbles [..., K] -> int16 bytes [..., K/2] in the chunked layout."""
    leading, k = nibbles.shape[:-1], nibbles.shape[-1]
    full = k - k % CHUNK
    parts = []
    if full:
        body = nibbles[..., :full].reshape(*leading, full // CHUNK, 2, CHUNK // 2)
        parts.append((body[..., 0, :] | (body[..., 1, :] << 4)).reshape(*leading, full // 2))
    tail = k - full
    if tail or not parts:
        rest = nibbles[..., full:]
        parts.append(rest[..., : tail // 2] | (rest[..., tail // 2 :] << 4))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def unpack_int4(packed: Tensor) -> Tensor:
    """Unpack uint8 ``[..., K/2]`` into int8 codes ``[..., K]`` in ``[-8, 7]`` (inverse of ``pack_int4``)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs uint8 packed codes, got {packed.dtype}")
    wide = packed.to(torch.int16)
    # Sign-extend a 4-bit two's complement nibble v: flipping bit 3 then subtracting 8 maps 0..7 -> 0..7
    # and 8..15 -> -8..-1.
    low, high = ((wide & 0xF) ^ 8) - 8, ((wide >> 4) ^ 8) - 8
    leading, half_k = packed.shape[:-1], packed.shape[-1]
    full = half_k - half_k % (CHUNK // 2)  # bytes of the full chunks
    parts = []
    if full:
        chunks = full // (CHUNK // 2)
        body = torch.stack((low[..., :full].reshape(*leading, chunks, CHUNK // 2),
                            high[..., :full].reshape(*leading, chunks, CHUNK // 2)), dim=-2)
        parts.append(body.reshape(*leading, 2 * full))
    if half_k - full or not parts:
        parts.append(torch.cat((low[..., full:], high[..., full:]), dim=-1))
    codes = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return codes.to(torch.int8)
