"""qtuning: data-efficient supervised fine-tuning with per-step sample and token pruning (Q-Tuning and baselines)."""

IGNORE_INDEX = -100

# Run totals in metrics.json (`SFTModule` counts them, the sweep summary shows them): the loss tokens of every optimizer
# step, and the positions through the forward passes and the backward pass of every micro-batch, over all devices.
TOKEN_TOTALS = ("train/loss_tokens_total", "prune/fwd_tokens_total", "prune/bwd_tokens_total")
