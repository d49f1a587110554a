"""qtuning: data-efficient supervised fine-tuning with per-step sample and token pruning (Q-Tuning and baselines)."""

IGNORE_INDEX = -100

# Run totals in metrics.json (`SFTModule` counts them, the sweep summary shows them): the loss tokens of every optimizer
# step (the loss denominator), the positions through the forward passes and the backward pass of every micro-batch,
# and the response tokens the loss was computed on (the denominator less the prompt positions a `loss_norm: nonpad`
# token pruner counts), over all devices.
TOKEN_TOTALS = (
    "train/loss_tokens_total",
    "prune/fwd_tokens_total",
    "prune/bwd_tokens_total",
    "train/response_tokens_total",
)
