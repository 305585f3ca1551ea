"""Torch <-> Triton tensors for the models that run PyTorch (scheduler, denoiser): GPU memory is
shared through DLPack, not copied."""

from __future__ import annotations

import torch
import triton_python_backend_utils as pb_utils


def to_torch(tensor, device: torch.device, copy: bool = False) -> torch.Tensor:
    """A Triton tensor as a torch tensor on `device`. `copy`: one that owns its memory, for use
    after the request is answered (a request's tensors may be freed then)."""
    value = torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else torch.from_dlpack(tensor.to_dlpack())
    moved = value.to(device)
    return moved.clone() if copy and moved.data_ptr() == value.data_ptr() else moved


def to_triton(name: str, value: torch.Tensor):
    if value.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))
    return pb_utils.Tensor(name, value.contiguous().numpy())


def call_unet(inputs: dict[str, torch.Tensor], device: torch.device, run=None, network: str = "unet") -> torch.Tensor:
    """One BLS call of the UNet with inputs named as contract.networks.UNET's: `unet_ip` when they carry
    image tokens, `unet_control` when they carry ControlNet residuals, `unet_lora` when they carry LoRA weights, else `unet`; or, `network`
    refiner_unet, of the refiner. Its noise_pred on `device`. `run`: the RunState to report a
    not-healthy callee to."""
    from contract.networks import REFINER_UNET, UNET, UNET_CONTROL, UNET_IP, UNET_LORA

    if network == REFINER_UNET.name:
        spec = REFINER_UNET
    elif "ip_tokens" in inputs:
        spec = UNET_IP
    else:
        spec = UNET_CONTROL if "control_residuals" in inputs else UNET_LORA if "lora_down" in inputs else UNET
    return call_network(spec, spec.name, inputs, device, run)


def call_controlnet(model: str, inputs: dict[str, torch.Tensor], device: torch.device, run=None) -> torch.Tensor:
    """One BLS call of a ControlNet's model (inputs named as its network's: contract.networks.CONTROLNET's
    or UNION_CONTROLNET's): its control_residuals on `device`."""
    from contract.networks import network_of

    return call_network(network_of(model), model, inputs, device, run)


def call_network(spec, model: str, inputs: dict[str, torch.Tensor], device: torch.device, run=None) -> torch.Tensor:
    from .common import infer

    tensors = []
    for tensor in spec.inputs:
        value = inputs[tensor.name]
        # [B] tensors of the graph (timestep, control_groups): Triton's configs give them dims [1] with reshape [].
        tensors.append(to_triton(tensor.name, value.reshape(-1, 1) if tensor.dims == ("batch",) else value))
    response = infer(model, tensors, spec.output_names, run)
    return to_torch(pb_utils.get_output_tensor_by_name(response, spec.output_names[0]), device)
