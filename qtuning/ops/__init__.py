"""Model operations: the passes over a batch (the final hidden states through the model's own forward, the scoring
pass), the layout of a pass's rows (right-padded or packed), the LM head in chunks (statistics and the loss, no
``[B, T, V]`` logits), and collectives over statistics.

Imports run one way: the module, the policies (`qtuning.pruning`) and the evaluation use these; these use nothing of
theirs.
"""

from qtuning.ops.distributed import (
    any_device,
    finite_on_every_device,
    gather_stats,
    most_on_any_device,
    world_size,
)
from qtuning.ops.layout import Layout, PassRows, packing_problem
from qtuning.ops.loss import OutputHead, token_loss
from qtuning.ops.passes import (
    Batch,
    base_model,
    final_hidden_states,
    length_groups,
    output_head,
    scoring_forward,
    select_rows,
)
from qtuning.ops.stats import BatchStats, concat_stats, shift_targets

__all__ = [
    "Batch",
    "BatchStats",
    "Layout",
    "PassRows",
    "OutputHead",
    "any_device",
    "base_model",
    "concat_stats",
    "final_hidden_states",
    "finite_on_every_device",
    "gather_stats",
    "length_groups",
    "most_on_any_device",
    "output_head",
    "packing_problem",
    "scoring_forward",
    "select_rows",
    "shift_targets",
    "token_loss",
    "world_size",
]
