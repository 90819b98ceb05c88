"""TQ-DiT (METHODS.md, docs/tqdit.md): multi-region (MRQ), time-grouped (TGQ) and Hessian-guided (HO)
quantization, with the attention matmuls on integer codes.

analyze: find the attention matmuls and the post-GELU linears; record the graph's calibration inputs.
calibrated: split the calibration timesteps into time groups; run the float graph again for per-head
    attention statistics and, for HO, the denoising loss's gradients; per-group activation parameters
    (two-region where MRQ applies); the Fisher-weighted scale search (registers the weights it rounds).
lowered: post-GELU linears on two-region codes; every static activation parameter read at each row's
    time group; scaled_dot_product_attention -> dqcompile.int_attention.
"""

from dqcompile.methods import MethodPasses
from dqcompile.passes.annotate_attention import annotate_attention
from dqcompile.passes.assign_time_groups import assign_time_groups
from dqcompile.passes.collect_tqdit_statistics import collect_tqdit_statistics
from dqcompile.passes.find_post_gelu_linears import find_post_gelu_linears
from dqcompile.passes.hessian_search import hessian_search
from dqcompile.passes.lower_mrq_linears import lower_mrq_linears
from dqcompile.passes.lower_time_groups import lower_time_groups
from dqcompile.passes.quantize_attention import quantize_attention
from dqcompile.passes.record_calibration_inputs import record_calibration_inputs
from dqcompile.passes.time_group_params import time_group_params

PASSES = MethodPasses(
    analyze=(annotate_attention, find_post_gelu_linears, record_calibration_inputs),
    calibrated=(assign_time_groups, collect_tqdit_statistics, time_group_params, hessian_search),
    lowered=(lower_mrq_linears, lower_time_groups, quantize_attention),
)
