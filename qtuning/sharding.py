"""Sharded data parallelism: FSDP2 (torch's ``fully_shard``) through Lightning's ``ModelParallelStrategy``.

``trainer=fsdp2`` (one node's GPUs) and ``trainer=fsdp2_cpu`` (two gloo processes) use `FSDP2Strategy`; the module
shards its model in ``configure_model`` with `shard_model`: each decoder layer, then the root (embeddings, final norm
and LM head). The root keeps its parameters gathered after the forward (FSDP2's default for a root), so that the LM
head can run on the final hidden states outside the model's forward, chunk by chunk, as it does unsharded.

Under FSDP2 every forward and backward pass is a collective (the layers' parameters are gathered for it): every process
must run as many passes as the others. The module makes sure of it (`SFTModule.train_kept`).
"""

from __future__ import annotations

import shutil
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from qtuning.errors import QTuningError
from qtuning.ops import base_model


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as data parallelism only (one mesh dimension, ``data_parallel``, over
    every process), with gradient synchronisation off for the backward passes of an accumulation but its last, and
    sharded checkpoints that a run killed while writing one cannot leave half-written."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """FSDP2's ``set_requires_gradient_sync(False)`` (Lightning's own context only knows DDP's ``no_sync``)."""
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)] if self.model is not None else []
        for module in modules:
            module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module.set_requires_gradient_sync(True, recurse=False)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A sharded checkpoint (a directory: each process's shards and rank 0's ``meta.pt``), written beside the
        target and then moved into place, so that ``last.ckpt`` is always a whole checkpoint."""
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            previous = path.with_name(f".{path.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            if path.exists():
                path.rename(previous)
            staging.rename(path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            shutil.rmtree(filepath, ignore_errors=True)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules of the classes Hugging Face keeps whole (``_no_split_modules``)."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_model(model: torch.nn.Module, mesh: Any, precision: str) -> None:
    """``fully_shard`` each decoder layer, then the root, on ``mesh``; under ``bf16-mixed`` through FSDP2's
    mixed-precision policy (bf16 parameters in the passes, fp32 gradient reduction, fp32 weights kept)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise QTuningError(
            f"trainer=fsdp2: {type(base_model(model)).__name__} names no decoder layer class (_no_split_modules) "
            "to shard; use trainer=ddp"
        )
    bf16 = str(precision).startswith("bf16-mixed")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, "mp_policy": policy} if policy is not None else {"mesh": mesh}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered from every process (each one must call this; rank 0 gets them,
    the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
