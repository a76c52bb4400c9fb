"""BatchNorm -> SyncBatchNorm conversion that respects frozen BatchNorms."""
from __future__ import annotations

from torch import nn

FROZEN_FLAG = "_hybridps_frozen"


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, but frozen BatchNorms stay as they are.

    A frozen BatchNorm (flag ``_hybridps_frozen``: running statistics always, affine frozen)
    has no batch statistics to synchronise.  torch's converter would replace it with a fresh
    SyncBatchNorm that drops the flag, so ``SearchModel.train()`` would switch it back to
    batch statistics.  Every other BatchNorm becomes a SyncBatchNorm sharing the same
    parameters and buffers.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        if getattr(module, FROZEN_FLAG, False):
            return module
        sync = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
