"""Recommended presets per bit-width: `auto-w8a8`, `auto-w4a8`, `auto-w6a6` (issue 16).

Each `auto-w*` name is the candidate the GPU evaluation picked (benchmarks/evaluate.py, row sets
"auto-w4a8", "auto-w6a6", "auto-w8a8", on an H200; docs/methods_quality.md has the tables): the best FID
against round to nearest with dynamic per-token activations and torchao, and among rows whose FIDs tie,
the highest PSNR against the float model's images. The `auto-w*-<pieces>` names stay registered as the
alternatives.

What a candidate combines, all on the kernels' fast path (per-channel weights, dynamic per-token
activations; a few candidates use groups, which the Triton GEMM and the fused quantizers also run):
- rounding: round to nearest, GPTQ (weights.rounding="gptq"), or PTQ4DiT's block reconstruction
  (AdaRound over each transformer block's output);
- balancing: PTQ4DiT's channel-wise salience balancing (CSB + SSC) folded into the weights, which
  moves activation outliers into the weights: worth it where the activations dominate the error
  (6-bit activations), a loss where 4-bit weights do (docs/ptq4dit.md);
- no static or time-grouped activations: dynamic per-token activations need no calibration of their
  ranges and are what the kernels fuse (quantize in the LayerNorm / GELU epilogue).
"""

from __future__ import annotations

from dqcompile.methods import register_preset
from dqcompile.methods.ptq4dit import PTQ4DiTOptions, ReconstructionOptions
from dqcompile.spec import ActivationSpec, QuantSpec, WeightSpec

# The piece names a candidate's name is made of, and what each means.
PIECES = {
    "rtn": "round-to-nearest weights",
    "gptq": "GPTQ weight rounding (calibration Hessians)",
    "recon": "PTQ4DiT block reconstruction (AdaRound, block output matching)",
    "csb": "PTQ4DiT salience balancing (CSB + SSC), folded into the weights",
    "g128": "weight groups of 128 input channels (fitted where 128 does not divide a layer)",
    "ag64": "weights and activations in groups of 64 input channels, activations dynamic per token and group "
            "(fitted where 64 does not divide a layer): for 6-bit activations, where the activations dominate",
}


def candidate(name: str, w_bits: int, a_bits: int, *, rounding: str = "rtn", balance: bool = False,
              group_size: int = 0, group_activations: bool = False) -> QuantSpec:
    """A candidate spec: per-channel (or grouped) symmetric weights, dynamic per-token activations (or per
    token and weight group), `rounding` one of "rtn", "gptq", "recon", with or without PTQ4DiT's balancing."""
    weights = WeightSpec(bits=w_bits, group_size=group_size, rounding="gptq" if rounding == "gptq" else "rtn")
    activations = ActivationSpec(bits=a_bits, mode="dynamic_group" if group_activations else "dynamic_token")
    common = dict(weights=weights, activations=activations, fit_group_sizes=bool(group_size), name=name)
    if not balance and rounding != "recon":
        return QuantSpec(**common)
    options = PTQ4DiTOptions(balance=balance, reconstruction=ReconstructionOptions(enabled=rounding == "recon"))
    return QuantSpec(**common, method="ptq4dit", options=options)


# (name, weight bits, activation bits, rounding, balance, group size, activations in the groups too)
CANDIDATE_TABLE: tuple[tuple[str, int, int, str, bool, int, bool], ...] = (
    ("auto-w8a8-gptq", 8, 8, "gptq", False, 0, False),
    ("auto-w8a8-csb", 8, 8, "rtn", True, 0, False),
    ("auto-w8a8-recon", 8, 8, "recon", False, 0, False),
    ("auto-w4a8-gptq", 4, 8, "gptq", False, 0, False),
    ("auto-w4a8-recon", 4, 8, "recon", False, 0, False),
    ("auto-w4a8-csb-recon", 4, 8, "recon", True, 0, False),
    ("auto-w4a8-g128-gptq", 4, 8, "gptq", False, 128, False),
    ("auto-w6a6-gptq", 6, 6, "gptq", False, 0, False),
    ("auto-w6a6-csb-gptq", 6, 6, "gptq", True, 0, False),
    ("auto-w6a6-recon", 6, 6, "recon", False, 0, False),
    ("auto-w6a6-csb-recon", 6, 6, "recon", True, 0, False),
    # At 5,000 samples the benchmark model's w6a6 error is mostly the activations' (docs/methods_quality.md).
    ("auto-w6a6-ag64-gptq", 6, 6, "gptq", False, 64, True),
)

CANDIDATES: dict[str, QuantSpec] = {
    name: candidate(name, w, a, rounding=rounding, balance=balance, group_size=group, group_activations=grouped)
    for name, w, a, rounding, balance, group, grouped in CANDIDATE_TABLE
}

# The pick per width (a candidate's definition under the short name), from the H200 tables
# (docs/methods_quality.md): w4a8 GPTQ matched the float FID on both models where round to nearest lost
# 0.4 and 2.6, and block reconstruction was no better at 16x the quantize time; at w8a8 and w6a6 every
# FID tied with the float model's, and GPTQ (w6a6: with balancing) was closest to the float images among
# the per-token candidates. `auto-w6a6-ag64-gptq` (groups of 64) tied it on FID on both models and was
# 2.5 dB closer to the float images on each, but sampled at a third of its speed (its GEMMs rescale every
# 64 columns): it stays the alternative for users who want the images closer, not the default.
RECOMMENDED: dict[str, str] = {
    "auto-w8a8": "auto-w8a8-gptq",
    "auto-w4a8": "auto-w4a8-gptq",
    "auto-w6a6": "auto-w6a6-csb-gptq",
}

for _spec in CANDIDATES.values():
    register_preset(_spec)
for _name, _source in RECOMMENDED.items():
    register_preset(CANDIDATES[_source].replace(name=_name))

__all__ = ["CANDIDATES", "CANDIDATE_TABLE", "PIECES", "RECOMMENDED", "candidate"]
