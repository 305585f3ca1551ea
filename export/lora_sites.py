"""LoRA sites in the traced graphs: every Linear and Conv2d of the UNet and text encoders gets an
unfused low-rank branch whose weights are graph inputs (contract/loras.py has the layout).

A site computes PEFT's LoRA output, `base(x) + up @ (down @ x)` with alpha/r and the request's
scale folded into `up`, per sample. The slices are taken once per call, outside the layers, so a
network carries two large inputs, not two per layer. A convolution's down step is one Conv with
the batch's down kernels stacked as output channels (a kernel from the inputs, which ONNX Runtime
and TensorRT run), from which each sample keeps its own channels; its up step is 1x1, a batched
matrix product.
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
    """The same for a convolution site: down [batch, rank, in*kh*kw] as kernels, up [batch, out, rank]
    as a 1x1 product. One Conv runs every sample's kernels on every sample; each keeps its own."""
    batch, rank = down.shape[0], down.shape[1]
    # [batch*rank, in, kh, kw]; unflatten + flatten, not reshape: the exporter then knows the kernel's
    # spatial size, which it needs to write a Conv
    kernel = down.unflatten(-1, (site.in_features, *site.kernel)).flatten(0, 1)
    hidden = F.conv2d(x, kernel, None, site.stride, site.padding, site.dilation)  # [batch, batch*rank, h, w]
    height, width = hidden.shape[2], hidden.shape[3]
    samples = torch.arange(batch, device=x.device)
    own = (samples[:, None] == samples[None, :]).to(hidden.dtype)  # [batch, batch]: the sample's own kernels
    hidden = (hidden.reshape(batch, batch, rank, height * width) * own[:, :, None, None]).sum(1)  # [batch, rank, h*w]
    return torch.bmm(up, hidden).reshape(batch, up.shape[1], height, width)


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
