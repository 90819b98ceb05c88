"""PTQ4DiT (METHODS.md, docs/ptq4dit.md): channel-wise salience balancing (CSB), optionally guided
by the Spearman correlation over timesteps (SSC), folded into the weights before they are quantized.

analyze: find the adaLN-modulated LayerNorm -> linear pairs and the V -> output projection pairs,
    and observe the balanced layers' inputs during calibration.
calibrated: compute one balancing vector per pair (CSB / CSB + SSC), then fold it into the weights.
"""

from dqcompile.methods import MethodPasses
from dqcompile.passes.find_adaln_pairs import analyze_balance_pairs
from dqcompile.passes.fold_balancing import fold_balancing
from dqcompile.passes.salience_balance import salience_balance

PASSES = MethodPasses(analyze=(analyze_balance_pairs,), calibrated=(salience_balance, fold_balancing))
