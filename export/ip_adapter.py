"""IP-Adapters (contract/ip_adapters.py; docs/ip-adapter.md): h94's SDXL files and their CLIP image encoder,
loaded into what the image_encoder and unet_ip graphs are traced from.

An h94 file (`.safetensors` with `image_proj.*` and `ip_adapter.*` keys, or a `.bin` holding both dicts)
is converted by diffusers' own loaders (UNet2DConditionLoadersMixin's converters, what load_ip_adapter
runs), so the image projection and the per-layer `to_k_ip`/`to_v_ip` are diffusers' modules with
diffusers' weights; they are kept beside the UNet rather than installed in it, so the UNet's other graphs
(and its LoRA site table) stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from contract.ip_adapters import PLAIN, PLUS, ip_layer_names

from .progress import log

# h94/IP-Adapter's SDXL files, as the docs name them: the plain and the Plus adapter on ViT-H/14, and their encoder.
DEFAULT_IP_ADAPTER = "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors"
DEFAULT_IMAGE_ENCODER = "h94/IP-Adapter/models/image_encoder"
# Where random pipelines keep theirs (export tiny): the plain adapter, the Plus one, their encoder.
IP_ADAPTER_SUBFOLDER, IMAGE_ENCODER_SUBFOLDER = "ip_adapter", "image_encoder"
PLAIN_FILE, PLUS_FILE = "ip-adapter.safetensors", "ip-adapter-plus.safetensors"
# CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's vision tower, h94's models/image_encoder) and
# OpenCLIP bigG/14 (sdxl_models/image_encoder): their CLIPVisionConfig, and their parameters counted on it.
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
VIT_BIGG_14 = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, patch_size=14,
                   image_size=224, projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5)


class IPAdapter(nn.Module):
    """One IP-Adapter: its image projection, and its key and value projections per IP layer of the UNet
    (`names`, diffusers' attention-processor names, in the UNet's order)."""

    def __init__(self, projection: nn.Module, names: list[str], to_k: list[nn.Linear], to_v: list[nn.Linear]):
        super().__init__()
        self.projection, self.names = projection, list(names)
        self.to_k, self.to_v = nn.ModuleList(to_k), nn.ModuleList(to_v)

    @property
    def kind(self) -> str:
        return PLAIN if type(self.projection).__name__ == "ImageProjection" else PLUS

    @property
    def tokens(self) -> int:
        """Image tokens per image: ImageProjection's num_image_text_embeds, or the Resampler's queries."""
        projection = self.projection
        return projection.num_image_text_embeds if self.kind == PLAIN else projection.latents.shape[1]

    @property
    def embed_dim(self) -> int:
        """The encoder output the projection takes: image_embeds' width (plain) or the hidden states' (Plus)."""
        projection = self.projection
        return projection.image_embeds.in_features if self.kind == PLAIN else projection.proj_in.in_features


def read_state_dict(source: str, flag: str = "--ip-adapter") -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} of an h94 file: a local path, or HUB_ID/PATH/FILE."""
    from .sources import ExportError, _load_error, hub_file

    path = Path(source).expanduser()
    try:
        if not path.exists() and hub_file(source.replace(".bin", ".safetensors")) is not None:
            from huggingface_hub import hf_hub_download

            parts = source.split("/")
            path = Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            state = {part: {key[len(part) + 1:]: value for key, value in flat.items() if key.startswith(part + ".")}
                     for part in ("image_proj", "ip_adapter")}
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # hub clients and loaders raise many types; each becomes one clear message
        raise _load_error(flag, source, error) from error
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ExportError(f"{flag} {source!r}: not an IP-Adapter file (h94's layout: image_proj.* and ip_adapter.* weights)")
    return state


def load_ip_adapter(source: str, unet, flag: str = "--ip-adapter") -> IPAdapter:
    """The IP-Adapter of an h94 file for `unet` (checked to fit it), by diffusers' converters, in fp32."""
    from .sources import ExportError

    state = read_state_dict(source, flag)
    projection_keys = state["image_proj"]
    if not ("proj.weight" in projection_keys or "latents" in projection_keys) or "proj.3.weight" in projection_keys:
        raise ExportError(f"{flag} {source!r}: an image projection this server does not serve (it serves the plain "
                          "IP-Adapter's ImageProjection and Plus's Resampler; not Full Face or FaceID)")
    names = ip_layer_names(unet.attn_processors)
    found = sum(1 for key in state["ip_adapter"] if key.endswith("to_k_ip.weight"))
    if found != len(names):
        raise ExportError(f"{flag} {source!r}: {found} IP layers, but the UNet has {len(names)} cross-attentions: an adapter "
                          "for another base model")
    try:
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(projection_keys, low_cpu_mem_usage=False)
        processors = unet._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
    except Exception as error:  # shapes that do not fit the UNet: one clear message, the first mismatch named
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "size mismatch" in line), lines[0])
        raise ExportError(f"{flag} {source!r}: does not fit the UNet ({reason})") from error
    if projection is None:
        raise ExportError(f"{flag} {source!r}: no image projection diffusers recognizes")
    adapter = IPAdapter(projection.float(), names, [processors[n].to_k_ip[0].float() for n in names],
                        [processors[n].to_v_ip[0].float() for n in names])
    out_dim = projection.norm.normalized_shape[0] if adapter.kind == PLAIN else projection.proj_out.out_features
    if out_dim != unet.config.cross_attention_dim:
        raise ExportError(f"{flag} {source!r}: image tokens {out_dim} wide, the UNet's cross-attention takes "
                          f"{unet.config.cross_attention_dim}")
    return adapter.eval()


def load_image_encoder(source: str, adapter: IPAdapter | None = None, flag: str = "--image-encoder"):
    """A CLIPVisionModelWithProjection: a directory or hub id, or HUB_ID/SUBFOLDER (h94's layout:
    h94/IP-Adapter/models/image_encoder); with `adapter`, checked to feed its projection."""
    from transformers import CLIPVisionModelWithProjection

    from .sources import ExportError, _load_error

    path = Path(source).expanduser()
    location, subfolder = str(path), ""
    if not path.exists() and source.count("/") >= 2 and not source.startswith(("/", ".", "~")):
        parts = source.split("/")
        location, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    elif not path.exists():
        location = source
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(location, subfolder=subfolder, dtype=torch.float32)
    except Exception as error:  # hub clients raise many types; each becomes one clear message
        raise _load_error(flag, source, error) from error
    config = encoder.config
    if config.image_size != 224:
        raise ExportError(f"{flag} {source!r}: image_size {config.image_size}; the served encoders take 224 (CLIP ViT-H/14, bigG/14)")
    if adapter is not None:
        width = config.projection_dim if adapter.kind == PLAIN else config.hidden_size
        what = "projection_dim (image_embeds)" if adapter.kind == PLAIN else "hidden_size (penultimate hidden states)"
        if width != adapter.embed_dim:
            raise ExportError(f"{flag} {source!r}: its {what} is {width}, the {adapter.kind} IP-Adapter's projection takes "
                              f"{adapter.embed_dim}: the adapter was trained on another encoder (ViT-H/14 for the vit-h files, "
                              "bigG/14 for ip-adapter_sdxl)")
    return encoder.eval()


def image_processor_config(image_size: int) -> dict:
    """What diffusers' load_ip_adapter registers when the pipeline has no feature extractor:
    CLIPImageProcessor(size=image_size, crop_size=image_size), as its JSON config."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size=image_size, crop_size=image_size).to_dict()


def tiny_image_encoder(seed: int):
    """A CLIP vision tower with projection at tiny widths (random weights), at the served 224 pixels."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=32,
                              image_size=224, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_ip_adapter_state(unet, encoder, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """A random IP-Adapter for `unet` and `encoder` in h94's flat .safetensors layout (plain: 4 tokens from
    image_embeds; Plus: a 4-layer Resampler, 64 wide, 16 queries as h94's, over the penultimate hidden states)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape, std=0.2):
        return (torch.randn(shape, generator=generator) * std).contiguous()

    dim = unet.config.cross_attention_dim
    flat: dict[str, torch.Tensor] = {}
    if kind == PLAIN:
        flat.update({"image_proj.proj.weight": weight(4 * dim, encoder.config.projection_dim),
                     "image_proj.proj.bias": weight(4 * dim), "image_proj.norm.weight": 1 + weight(dim, std=0.1),
                     "image_proj.norm.bias": weight(dim, std=0.1)})
    else:
        hidden, embed = 64, encoder.config.hidden_size  # heads = hidden // 64 (diffusers' converter)
        flat.update({"image_proj.latents": weight(1, 16, hidden, std=hidden ** -0.5),
                     "image_proj.proj_in.weight": weight(hidden, embed), "image_proj.proj_in.bias": weight(hidden, std=0.02),
                     "image_proj.proj_out.weight": weight(dim, hidden), "image_proj.proj_out.bias": weight(dim, std=0.02),
                     "image_proj.norm_out.weight": 1 + weight(dim, std=0.1), "image_proj.norm_out.bias": weight(dim, std=0.1)})
        for layer in range(4):  # IPAdapterPlusImageProjection's depth, which diffusers' converter assumes
            prefix = f"image_proj.layers.{layer}"
            for norm in ("0.norm1", "0.norm2", "1.0"):
                flat[f"{prefix}.{norm}.weight"], flat[f"{prefix}.{norm}.bias"] = 1 + weight(hidden, std=0.1), weight(hidden, std=0.1)
            flat.update({f"{prefix}.0.to_q.weight": weight(hidden, hidden), f"{prefix}.0.to_kv.weight": weight(2 * hidden, hidden),
                         f"{prefix}.0.to_out.weight": weight(hidden, hidden), f"{prefix}.1.1.weight": weight(4 * hidden, hidden),
                         f"{prefix}.1.3.weight": weight(hidden, 4 * hidden)})
    for index, name in enumerate(ip_layer_names(unet.attn_processors)):
        width = _attention_width(unet, name)
        flat[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = weight(width, dim)
        flat[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = weight(width, dim)
    return flat


def _attention_width(unet, processor_name: str) -> int:
    """The inner width of the attention a processor name belongs to (its to_k's output)."""
    module = unet.get_submodule(processor_name.removesuffix(".processor"))
    return module.to_k.out_features


def write_tiny_ip_adapters(out_dir: Path, unet, seed: int) -> None:
    """The tiny pipeline's image encoder (image_encoder/) and its two adapters (ip_adapter/: plain and Plus)."""
    from safetensors.torch import save_file

    encoder = tiny_image_encoder(seed)
    encoder.save_pretrained(out_dir / IMAGE_ENCODER_SUBFOLDER, safe_serialization=True)
    (out_dir / IP_ADAPTER_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    for kind, file in ((PLAIN, PLAIN_FILE), (PLUS, PLUS_FILE)):
        save_file(tiny_ip_adapter_state(unet, encoder, kind, seed + (kind == PLUS)), str(out_dir / IP_ADAPTER_SUBFOLDER / file))
    log(f"IP-Adapters (plain and Plus, tiny, random weights) and their image encoder written to {out_dir}")
