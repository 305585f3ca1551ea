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
    """`up @ (down @ x)` per sample. x [batch, ..., in]; down [batch, rank, in]; up [batch, out, rank]."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
    delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))  # [batch, tokens, out]
    return delta.reshape(*x.shape[:-1], up.shape[1])


def conv_delta(x: torch.Tensor, site: Site, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same for a convolution site: down [batch, rank, in*kh*kw] (PEFT's down convolution, its
    kernel flattened), up [batch, out, rank] (a 1x1 convolution). The down convolution runs as a sum
    over the kernel's taps of a shifted, strided view of x times that tap's [rank, in] matrix, all
    batched products: TensorRT builds no Conv whose output channels (the rank) are dynamic."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = site.kernel, site.stride, site.padding, site.dilation
    batch, channels, height, width = x.shape
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    taps = down.unflatten(-1, (site.in_features, kh * kw))  # [batch, rank, in, taps]
    hidden = None
    for tap in range(kh * kw):
        i, j = divmod(tap, kw)
        view = padded[:, :, i * dh: i * dh + (out_h - 1) * sh + 1: sh, j * dw: j * dw + (out_w - 1) * sw + 1: sw]
        term = torch.bmm(taps[..., tap], view.reshape(batch, channels, -1))  # [batch, rank, h*w]
        hidden = term if hidden is None else hidden + term
    return torch.bmm(up, hidden).reshape(batch, up.shape[1], out_h, out_w)


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
