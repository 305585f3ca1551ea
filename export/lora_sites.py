"""LoRA sites in the traced graphs: every Linear and Conv2d of the UNet and text encoders gets an
unfused low-rank branch whose weights are graph inputs (contract/loras.py has the layout).

A site computes PEFT's LoRA output, `base(x) + up @ (down @ x)` with alpha/r and the request's
scale folded into `up`, per sample. The slices are taken once per call, outside the layers, so a
network carries two large inputs, not two per layer. Everything is batched matrix products, the
convolutions' down step included (one per kernel tap): TensorRT builds no Conv with a dynamic
number of output channels, which a kernel of the request's rank would be.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from contract.loras import Site, SiteTable


def linear_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`up @ (down @ x)` per sample. x [batch, ..., in]; down [batch, rank, in]; up [batch, out, rank].
    The usual inputs (tokens [batch, tokens, in], vectors [batch, in]) need no reshape: each reshape
    of a traced shape costs the graph a handful of shape nodes, at each of 139 sites of SDXL's UNet."""
    if x.dim() == 3:
        return torch.bmm(torch.bmm(x, down.transpose(1, 2)), up.transpose(1, 2))
    if x.dim() == 2:
        return torch.bmm(torch.bmm(x.unsqueeze(1), down.transpose(1, 2)), up.transpose(1, 2)).squeeze(1)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
    delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))  # [batch, tokens, out]
    return delta.reshape(*x.shape[:-1], up.shape[1])


def conv_delta(x: torch.Tensor, site: Site, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same for a convolution site: down [batch, rank, in*kh*kw] (PEFT's down convolution, its
    kernel flattened), up [batch, out, rank] (a 1x1 convolution). TensorRT builds no Conv whose
    output channels (the rank) are dynamic, so the down convolution is a batched product instead:
    every kernel tap's [rank, in] matrix applied to x at once (rank x taps maps); then one fixed
    convolution with a one-hot kernel per tap (taps in, 1 out: static channels) shifts each tap's map
    into place and sums them, with the layer's stride, padding and dilation. The shifts move
    rank-channel maps, not x. (Slicing each tap's map, with linear_delta's reshapes, gave the same
    numbers in a graph of 17,040 traced nodes, 8,573 now: the tiny UNet with LoRA inputs took 12.5 s
    to trace, 4.9 s now.)"""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = site.kernel, site.stride, site.padding, site.dilation
    batch, channels, height, width = x.shape
    rank, taps = down.shape[1], kh * kw
    # [batch, rank, in, taps] -> [batch, rank*taps, in]: one product for every tap
    per_tap = down.unflatten(-1, (site.in_features, taps)).transpose(2, 3).reshape(batch, -1, site.in_features)
    maps = torch.bmm(per_tap, x.reshape(batch, channels, -1))  # [batch, rank*taps, h*w]
    if taps == 1 and (sh, sw) == (1, 1) and (ph, pw) == (0, 0):
        return torch.bmm(up, maps).reshape(batch, up.shape[1], height, width)  # a 1x1 convolution: over the channels
    one_hot = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(1, taps, kh, kw)
    hidden = F.conv2d(maps.reshape(-1, taps, height, width), one_hot, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    out_h, out_w = hidden.shape[-2:]
    return torch.bmm(up, hidden.reshape(batch, rank, -1)).reshape(batch, up.shape[1], out_h, out_w)


@contextmanager
def lora_branches(components: dict[str, nn.Module], table: SiteTable, down: torch.Tensor, up: torch.Tensor):
    """While inside: every site of `table` in `components` adds its LoRA branch to its output
    (forward hooks, which the ONNX tracer records like any other op); removed on exit, so the
    pipeline's modules are left as they were."""
    handles = []
    for site, down_offset, up_offset in zip(table.sites, table.down_offsets, table.up_offsets):
        component, _, path = site.name.partition(".")
        module = components[component].get_submodule(path)
        site_down = down[:, :, down_offset:down_offset + site.down_width]
        site_up = up[:, up_offset:up_offset + site.out_features, :]
        if site.kind == "linear":
            def hook(module, args, output, site_down=site_down, site_up=site_up):
                return output + linear_delta(args[0], site_down, site_up)
        else:
            def hook(module, args, output, site=site, site_down=site_down, site_up=site_up):
                return output + conv_delta(args[0], site, site_down, site_up)
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
