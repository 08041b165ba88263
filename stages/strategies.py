"""Lightning's sharded strategies on CPU processes (gloo), to prove a multi-GPU configuration on a
laptop or in CI before it meets a GPU: `trainer=fsdp_cpu`, `trainer=deepspeed_cpu`, `trainer=fsdp2_cpu`.

Each class is the GPU strategy with only its device checks relaxed; the sharding, the
optimiser handling and the checkpoint code that runs is the one a GPU run uses.

- `CPUFSDPStrategy`: Lightning refuses `accelerator=cpu` only when the strategy's type *is*
  `FSDPStrategy`; torch's FSDP runs on CPU with `device_id=None` and the gloo backend.
- `CPUDeepSpeedStrategy`: Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA and
  device indices other than 0..n-1; DeepSpeed itself runs on CPU with `DS_ACCELERATOR=cpu`
  (set here, before DeepSpeed picks its accelerator) and the gloo backend.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn


class CPUFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy` on CPU processes (gloo). Same wrapping, sharding and checkpoints."""

    strategy_name = "fsdp_cpu"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # Lightning's own `_setup_model` passes `device_id=root_device.index` (None on CPU), which
        # torch's FSDP reads as "find an accelerator"; `torch.device("cpu")` is what it accepts.
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def optimizer_state(self, optimizer):
        # torch's full optimiser state dict with `offload_to_cpu=True` (what Lightning asks for)
        # reuses one gather buffer for every state of a flat parameter and "offloads" with
        # `.cpu()`, which on CPU tensors returns the same storage: every `exp_avg` came out as
        # the `exp_avg_sq` gathered after it, and a resume stepped on wrong moments. On a GPU
        # `.cpu()` copies. On CPU: the same dict without the offload (torch clones instead).
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        ):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` on CPU processes (gloo). Same engine, ZeRO partitioning, optimiser
    and checkpoints; only Lightning's CUDA and device-index checks are skipped.

    DeepSpeed picks its accelerator once per process, on first use: `DS_ACCELERATOR=cpu` is set
    when the strategy is built (the ranks Lightning starts inherit it). Its CPU accelerator
    builds a small shared-memory op the first time (~90 s, cached under ~/.cache/torch_extensions).
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, **kwargs):
        os.environ["DS_ACCELERATOR"] = "cpu"
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed's engine takes the root device's index as its device rank and needs one
        # (`device_rank >= 0`); the CPU accelerator ignores its value.
        return torch.device("cpu", 0)

    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment only adds "the accelerator must be CUDA"
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed without `_validate_device_index_selection`
        # (CPU devices carry no index)
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as our stages use it: FSDP2 (`fully_shard`, applied by
    `Stage.configure_model`, see `stages.fsdp2`) over every rank, on GPUs (NCCL) or CPU
    processes (gloo: Lightning picks the backend and the mesh's device type from the devices).

    What differs from Lightning's class, and why:
    - `data_parallel_size="auto"` is the world size (Lightning's "auto" is the number of
      nodes, with "auto" tensor parallelism over each node's GPUs; our stages apply no tensor
      parallelism), and `tensor_parallel_size` must be 1: anything else is refused here.
    - `save_distributed_checkpoint=True` is refused: it writes a folder per checkpoint, and
      what a stage hands off (`last.ckpt`, the hand-offs) must be one file that
      `siglip2.checkpoint` (eval, export, init_from, the recipe chain) reads. With False, rank
      0 writes the full state dict and the full optimiser state in one file.
    - Resuming from such a file loads the weights after the stage's `on_load_checkpoint` (as
      DDP does; Lightning's class loads them first and hands the hook a checkpoint without
      `state_dict`, so the stage's state-dict upgrades and shape checks could not run), and
      the full optimiser state through `set_optimizer_state_dict`.
    """

    strategy_name = "fsdp2"

    def __init__(
        self, data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint: bool = False, **kwargs
    ):
        if tensor_parallel_size not in (1, "1"):
            raise ValueError(
                f"{type(self).__name__}: tensor_parallel_size={tensor_parallel_size!r} is not supported: "
                "the stages shard with FSDP2 over data-parallel ranks only and apply no tensor "
                "parallelism; set tensor_parallel_size: 1"
            )
        if save_distributed_checkpoint:
            raise ValueError(
                f"{type(self).__name__}: save_distributed_checkpoint=True writes each checkpoint as a "
                "folder of shards, which siglip2.checkpoint (eval, export, init_from, stage hand-offs) "
                "cannot read; set save_distributed_checkpoint: false (rank 0 writes one full file)"
            )
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from pathlib import Path

        from lightning.fabric.strategies.model_parallel import _is_full_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not _is_full_checkpoint(path):  # a folder of shards (another writer): Lightning's own loader
            self._loaded_by_lightning = True
            return super().load_checkpoint(path, weights_only=weights_only)
        self._loaded_by_lightning = False
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        if getattr(self, "_loaded_by_lightning", True) or "state_dict" not in checkpoint:
            return
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state

        _load_raw_module_state(checkpoint["state_dict"], self.model, world_size=self.world_size, strict=strict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        if getattr(self, "_loaded_by_lightning", True):
            return
        from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            state = _rekey_optimizer_state_if_needed(state, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
