"""Synchronised BatchNorm for every device: batch statistics over the global batch of all ranks.

With BatchNorm in training mode each rank normalises by the statistics of its own slice of the batch,
so a 2-process run is not the 1-process run with the same global batch. ``torch.nn.SyncBatchNorm``
fixes that on GPUs only (it refuses CPU tensors); :class:`SyncBatchNorm` here computes the same
thing with one all-reduce forward and one backward per layer, so it works under gloo on CPU as
well. :func:`convert_sync_batchnorm` picks torch's fused version for CUDA models and this one
otherwise. State-dict keys do not change, so checkpoints load into plain BatchNorm models.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the samples of every rank: one collective forward (each rank's count,
    mean and sum of squared deviations, merged as in Chan et al.'s parallel variance), one backward
    (the global sums of ``dy`` and ``dy · x̂`` per channel), as ``torch.nn.SyncBatchNorm`` does on GPUs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, module: SyncBatchNorm) -> Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        channels = xf.shape[1]
        n_local = xf.numel() / channels
        mean_local = xf.mean(dims)
        m2_local = (xf - mean_local.view(shape)).pow(2).sum(dims)
        world, rank = dist.get_world_size(), dist.get_rank()
        slots = xf.new_zeros(world, 2 * channels + 1)  # an all-gather by one all-reduce of disjoint rows
        slots[rank, :channels], slots[rank, channels:-1], slots[rank, -1] = mean_local, m2_local, n_local
        dist.all_reduce(slots, op=dist.ReduceOp.SUM)
        means, m2s, counts = slots[:, :channels], slots[:, channels:-1], slots[:, -1:]
        n = counts.sum()
        mean = (means * counts).sum(0) / n
        m2 = m2s.sum(0) + ((means - mean).pow(2) * counts).sum(0)
        var = m2 / n
        invstd = torch.rsqrt(var + module.eps)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        if module.track_running_stats:
            module.num_batches_tracked.add_(1)
            m = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            module.running_mean.lerp_(mean.to(module.running_mean.dtype), m)
            module.running_var.lerp_((m2 / (n - 1).clamp(min=1)).to(module.running_var.dtype), m)
        y = xhat if weight is None else xhat * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.dims, ctx.shape = n, dims, shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyf = dy.float()
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        g_sum_dy, g_sum_dy_xhat = both.chunk(2)
        scale = invstd if weight is None else invstd * weight.float()
        dx = scale.view(shape) * (dyf - (g_sum_dy / ctx.n).view(shape) - xhat * (g_sum_dy_xhat / ctx.n).view(shape))
        grad_w = grad_b = None
        if weight is not None:  # this rank's share: DDP averages parameter gradients over ranks
            grad_w, grad_b = sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)
        return dx.to(dy.dtype), grad_w, grad_b, None


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
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self)


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
