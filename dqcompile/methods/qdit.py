"""Q-DiT (METHODS.md, docs/qdit.md): group quantization with per-layer group sizes, dynamic
activations, and RTN-with-clipping or GPTQ weight rounding.

Most of Q-DiT is in the spec and the generic passes: per-layer group sizes (QuantSpec.layer, from
qdit.group_sizes or a searched plan), the per-group integer linear (lower_linears, int_linear), and
dynamic activations per token and group or per sample and group (quantize_act,
quantize_act_per_sample), computed at every call, so no per-timestep table exists. What the method
adds to the pipeline is GPTQ, when spec.qdit.rounding is "gptq": Hessian accumulators on the
quantized layers' inputs during calibration, then GPTQ rounding before quantize_weights. The group
sizes themselves come from dqcompile.search.search_group_sizes.
"""

from dqcompile.methods import MethodPasses
from dqcompile.passes.gptq import gptq_weights
from dqcompile.passes.hessians import insert_hessian_accumulators

PASSES = MethodPasses(analyze=(insert_hessian_accumulators,), calibrated=(gptq_weights,))
