"""Synchronised BatchNorm for every device: batch statistics over the global batch of all ranks.

With BatchNorm in training mode each rank normalises by the statistics of its own slice of the batch,
so a 2-process run is not the 1-process run with the same global batch. ``torch.nn.SyncBatchNorm``
fixes that on GPUs only (it refuses CPU tensors); :class:`SyncBatchNorm` here computes the same
thing with two differentiable all-reduces (sum, then sum of squared deviations) through
``torch.distributed.nn``, so it works under gloo on CPU as well. :func:`convert_sync_batchnorm` picks
torch's fused version for CUDA models and this one otherwise. State-dict keys do not change, so
checkpoints load into plain BatchNorm models.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the incoming gradients (each rank's
    output feeds that rank's loss, and the global loss is their sum)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _all_reduce_sum(t: Tensor) -> Tensor:
    return _AllReduceSum.apply(t)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch, for inputs ``[N, C, *]`` on any device.

    Training mode inside an initialised process group: mean and (biased) variance over the samples of
    every rank, running statistics updated with the unbiased variance of the global batch, exactly as
    one BatchNorm over the concatenated batch would (up to float summation order). Otherwise (eval
    mode, or a world of one) it is plain ``F.batch_norm``."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, *], got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        synced = (self.training and dist.is_available() and dist.is_initialized()
                  and dist.get_world_size() > 1)
        if not synced:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=torch.float32, device=x.device)
        sums = _all_reduce_sum(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _all_reduce_sum(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """Replace every BatchNorm of ``model`` by a synchronised one (``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`SyncBatchNorm` elsewhere), keeping weights, buffers and ``requires_grad``. Returns the model
    and how many layers were converted."""
    if device.type == "cuda":
        n = sum(isinstance(m, _BatchNorm) for m in model.modules())
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), n
    count = 0

    def convert(module: nn.Module) -> nn.Module:
        nonlocal count
        if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
            new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=None, dtype=None)
            new.load_state_dict(module.state_dict())
            if module.affine:
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
            new.to(device)
            new.train(module.training)
            count += 1
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model), count
