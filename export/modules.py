"""The PyTorch modules that become the ONNX graphs, with the signatures of `networks.py`.

Each wraps diffusers/transformers modules without changing their math; what diffusers' SDXL
pipeline does around a call (hidden-state choice, latent scaling, pixel conversion) moves inside.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from contract import networks
from contract.loras import sites_of

from .lora_sites import lora_branches


class TextEncoders(nn.Module):
    """Both CLIP encoders, as `StableDiffusionXLPipeline.encode_prompt` uses them (clip_skip=None)."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        # Eager attention: the same math as SDPA, but the exporter's SDPA-with-mask lowering mixes
        # fp32 into fp16 graphs (ONNX Runtime then rejects them).
        for encoder in (text_encoder, text_encoder_2):
            encoder.set_attn_implementation("eager")
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.components = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        self.lora_sites = sites_of(networks.TEXT_ENCODER.name, self.components)

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor, lora_down=None, lora_up=None):
        """Without LoRA tensors: the encoders alone (what the pipeline computes with no LoRA)."""
        if lora_down is None:
            return self._encode(input_ids, input_ids_2)
        with lora_branches(self.components, self.lora_sites, lora_down, lora_up):
            return self._encode(input_ids, input_ids_2)

    def _encode(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor):
        # Token ids arrive as INT32 (what TensorRT and Triton clients handle everywhere); CLIP wants int64.
        hidden = self.text_encoder(input_ids.long(), output_hidden_states=True).hidden_states[-2]
        out_2 = self.text_encoder_2(input_ids_2.long(), output_hidden_states=True)
        prompt_embeds = torch.cat([hidden, out_2.hidden_states[-2]], dim=-1)
        return prompt_embeds, out_2.text_embeds


class UNet(nn.Module):
    """The UNet with SDXL's added conditioning as plain inputs and one timestep per sample."""

    def __init__(self, unet, lora: bool = True, ip_adapter=None):
        """`lora`: read the UNet's LoRA sites (the refiner's UNet takes no LoRA inputs). `ip_adapter`
        (export/ip_adapter.py IPAdapter): its layers take the image tokens (unet_ip)."""
        super().__init__()
        self.unet = unet
        self.lora_sites = sites_of(networks.UNET.name, {"unet": unet}) if lora else None
        self.ip_adapter = ip_adapter

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, lora_down=None, lora_up=None,
                control_residuals=None, ip_tokens=None, ip_layer_scales=None):
        """Without LoRA tensors: the UNet alone. `control_residuals`: ControlNets' residuals, flattened
        (networks.CONTROL_RESIDUALS), added as StableDiffusionXLControlNetPipeline adds them. `ip_tokens`,
        `ip_layer_scales`: each row's image tokens and per-layer scales for the IP-Adapter's layers."""
        kwargs = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}, "return_dict": False}
        if control_residuals is not None:
            config = self.unet.config
            layout = networks.control_residual_layout(config.block_out_channels, config.layers_per_block)
            *down, mid = split_residuals(control_residuals, layout, sample.shape[2], sample.shape[3])
            kwargs.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        with ip_attention(self.unet, self.ip_adapter, ip_tokens, ip_layer_scales):
            if lora_down is None:
                return self.unet(sample, timestep, encoder_hidden_states, **kwargs)[0]
            with lora_branches({"unet": self.unet}, self.lora_sites, lora_down, lora_up):
                return self.unet(sample, timestep, encoder_hidden_states, **kwargs)[0]


class RowScaledIPAttention:
    """diffusers' IPAdapterAttnProcessor2_0 (one adapter, no masks) with its scale per row: the text
    attention, plus `scales[row]` x the attention over the row's image tokens through the layer's to_k_ip
    and to_v_ip, before to_out. diffusers multiplies by a Python float, which PyTorch applies in fp32 to a
    half tensor: here the fp32 scale times the fp32 upcast, rounded back, the same operation. A row of
    zero tokens adds exactly 0 (to_k_ip and to_v_ip have no bias). Not an nn.Module: set as a processor, it
    must not register its weights inside the UNet."""

    def __init__(self, to_k_ip: nn.Linear, to_v_ip: nn.Linear, tokens: torch.Tensor, scales: torch.Tensor):
        self.to_k_ip, self.to_v_ip, self.tokens, self.scales = to_k_ip, to_v_ip, tokens, scales

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        F = nn.functional
        residual, input_ndim = hidden_states, hidden_states.ndim
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(tensor):
            return tensor.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        def merged(tensor):
            return tensor.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        query = heads(query)
        hidden_states = merged(F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=None, dropout_p=0.0,
                                                              is_causal=False))
        image = merged(F.scaled_dot_product_attention(query, heads(self.to_k_ip(self.tokens)), heads(self.to_v_ip(self.tokens)),
                                                      attn_mask=None, dropout_p=0.0, is_causal=False))
        hidden_states = hidden_states + (self.scales.view(-1, 1, 1) * image.float()).to(image.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def ip_attention(unet, adapter, tokens, scales):
    """While inside: the adapter's layers of `unet` attend to each row's image `tokens` too, times the
    row's `scales` for that layer ([batch, ip_layers], in the adapter's layer order); the UNet's own
    processors are back on exit. Nothing happens without tokens."""
    if tokens is None:
        yield
        return
    tokens = tokens.to(unet.dtype)
    kept = {}
    try:
        for index, name in enumerate(adapter.names):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            kept[attention] = attention.processor
            # Set as an attribute, not by set_processor: a processor that is not an nn.Module stays one.
            attention.processor = RowScaledIPAttention(adapter.to_k[index], adapter.to_v[index], tokens, scales[:, index])
        yield
    finally:
        for attention, processor in kept.items():
            attention.processor = processor


class ImageEncoder(nn.Module):
    """networks.IMAGE_ENCODER: the adapter's image encoder (CLIPVisionModelWithProjection) on the
    processor's pixel values, then its image projection, as StableDiffusionXLPipeline's encode_image and
    the UNet's encoder_hid_proj compute them: the plain adapter projects image_embeds; Plus projects the
    penultimate hidden states (output_hidden_states). The negative tokens of CFG, diffusers': the projection
    of zeros (plain) or of the encoding of a zero image (Plus), computed once here, a constant of the graph."""

    def __init__(self, encoder, adapter):
        super().__init__()
        self.encoder, self.adapter = encoder, adapter
        self.plus = adapter.kind == "plus"
        with torch.no_grad():
            size = encoder.config.image_size
            zeros = torch.zeros(1, 3, size, size, dtype=encoder.dtype, device=encoder.device)
            negative = self.adapter.projection(self._embeds(zeros) if self.plus else torch.zeros_like(self._embeds(zeros)))
        self.register_buffer("negative", negative.to(encoder.dtype), persistent=False)

    def _embeds(self, pixel_values):
        if self.plus:
            return self.encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.encoder(pixel_values).image_embeds

    def forward(self, pixel_values):
        tokens = self.adapter.projection(self._embeds(pixel_values.to(self.encoder.dtype)))  # [batch, tokens, dim]
        return tokens, self.negative.reshape(1, *tokens.shape[1:]).expand(tokens.shape[0], -1, -1)


def flatten_residuals(residuals) -> torch.Tensor:
    """A ControlNet's down and mid residuals as networks.CONTROL_RESIDUALS: [batch, control_size]."""
    return torch.cat([r.flatten(1) for r in residuals], dim=1)


def split_residuals(flat: torch.Tensor, layout, latent_height, latent_width) -> list[torch.Tensor]:
    """flatten_residuals undone: each residual of `layout` (networks.control_residual_layout) at its
    channels and size for latents of latent_height x latent_width (traced: symbolic sizes)."""
    residuals, start = [], 0
    for channels, level in layout:
        height, width = latent_height // 2 ** level, latent_width // 2 ** level
        size = channels * height * width
        residuals.append(flat[:, start:start + size].reshape(flat.shape[0], channels, height, width))
        start = start + size
    return residuals


class ControlNet(nn.Module):
    """diffusers' ControlNetModel as StableDiffusionXLControlNetPipeline calls it (guess mode off), at
    conditioning scale 1 (the loop scales each ControlNet's residuals per request: the same product
    diffusers takes inside the model). The control image arrives as the endpoint takes it, uint8 RGB
    NHWC at the output size; the pipeline's control_image_processor (VaeImageProcessor without
    normalization: fp32 x / 255, then the model's dtype) runs in the graph."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond):
        # The Cast first: TensorRT takes UINT8 only at the network's edge, straight into a Cast.
        image = (controlnet_cond.to(torch.float32).permute(0, 3, 1, 2) / 255.0).to(self.controlnet.dtype)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=image, conditioning_scale=1.0,
                                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)
        return flatten_residuals([*down, mid])


class UnionControlNet(nn.Module):
    """diffusers' ControlNetUnionModel.forward as StableDiffusionXLControlNetUnionPipeline calls it (guess
    mode off, global pooling off), for the rows of several requests at once (networks.UNION_CONTROLNET):
    - each row's mode slots: control images (uint8 NHWC, the pipeline's x / 255 in the graph), mode
      indices (-1: an empty slot) and scales inside the network (1 for a lone mode: diffusers scales its
      residuals after, which the loop does; mode scale x keep for several). An empty slot's scale is 0:
      its condition and token add nothing, and its token, attending only to itself (below), to no one.
    - control_type, the multi-hot of the row's modes, from the mode indices.
    - the transformer: diffusers feeds [rows, tokens, channels] to nn.MultiheadAttention, which takes
      dim 0 as the sequence: each token position attends across the ROWS of the call (both CFG halves,
      every image). Kept exactly, with rows attending only to rows of their own control_groups value,
      so that one call serves several requests as each one's own call would.
    Returns the residuals unscaled by a lone mode's scale (the loop's product, as for a ControlNet)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond, control_modes,
                control_mode_scales, control_groups):
        net, dtype = self.controlnet, self.controlnet.dtype
        rows, slots = controlnet_cond.shape[0], controlnet_cond.shape[1]
        present = control_modes >= 0
        types = torch.arange(net.config.num_control_type, device=sample.device)
        control_type = (control_modes[:, :, None] == types).any(dim=1).to(dtype)  # [rows, num_control_type]
        # 1. time, added conditions and control types, in diffusers' order of addition
        t_emb = net.time_proj(timestep.expand(rows)).to(dtype)
        emb = net.time_embedding(t_emb)
        time_embeds = net.add_time_proj(time_ids.flatten()).reshape(rows, -1)
        aug_emb = net.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        control_embeds = net.control_type_proj(control_type.flatten()).reshape(rows, -1).to(emb.dtype)
        emb = emb + net.control_add_embedding(control_embeds)
        emb = emb + aug_emb
        # 2. the conditions: one embedding per slot, its token, the transformer, the fused condition
        sample = net.conv_in(sample)
        images = controlnet_cond.to(torch.float32).permute(0, 1, 4, 2, 3) / 255.0
        images = images.reshape(rows * slots, *images.shape[2:]).to(dtype)
        conditions = net.controlnet_cond_embedding(images)
        conditions = conditions.reshape(rows, slots, *conditions.shape[1:])
        scales = (control_mode_scales * present).to(dtype)
        tokens = conditions.mean(dim=(3, 4)) + net.task_embedding[control_modes.clamp(min=0)]
        tokens = torch.cat([tokens * scales[:, :, None], sample.mean(dim=(2, 3))[:, None]], dim=1)
        same_request = control_groups[:, None] == control_groups[None, :]
        for layer in net.transformer_layes:
            tokens = tokens + _attention_across_rows(layer.attn, layer.ln_1(tokens), same_request)
            tokens = tokens + layer.mlp(layer.ln_2(tokens))
        alphas = net.spatial_ch_projs(tokens[:, :slots])  # [rows, slots, channels]
        fused = conditions * scales[:, :, None, None, None] + (alphas * scales[:, :, None])[:, :, :, None, None]
        sample = sample + fused.sum(dim=1)
        # 3. down, 4. mid, 5. the ControlNet blocks, as ControlNetUnionModel
        residuals = (sample,)
        for block in net.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, outputs = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, outputs = block(hidden_states=sample, temb=emb)
            residuals += outputs
        sample = net.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        down = [block(residual) for residual, block in zip(residuals, net.controlnet_down_blocks)]
        return flatten_residuals([*down, net.controlnet_mid_block(sample)])


def _attention_across_rows(attention: nn.MultiheadAttention, tokens: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention(tokens, tokens, tokens) with dim 0 (rows) as its sequence, as diffusers calls
    it on [rows, tokens, channels], each row attending only where `allowed` [rows, rows] is true."""
    rows, count, channels = tokens.shape
    heads = attention.num_heads
    head_dim = channels // heads
    query, key, value = nn.functional.linear(tokens, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)

    def split(tensor):  # [rows, tokens, channels] -> [tokens, heads, rows, head_dim]
        return tensor.reshape(rows, count, heads, head_dim).permute(1, 2, 0, 3)

    scores = split(query) @ split(key).transpose(-1, -2) / head_dim ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    mixed = torch.softmax(scores, dim=-1) @ split(value)  # [tokens, heads, rows, head_dim]
    return attention.out_proj(mixed.permute(2, 0, 1, 3).reshape(rows, count, channels))


class DepthEstimator(nn.Module):
    """transformers' DepthAnythingForDepthEstimation (networks.DEPTH_ESTIMATOR): its processor's pixel
    values in fp32, its relative depth out in fp32, whatever the export's dtype (the loop normalizes it).
    Its forward, with the head's upsampling size kept a traced value (transformers' head takes int() of
    it, which would fix every graph to the traced size)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        model, patch = self.model, self.model.config.patch_size
        pixel_values = pixel_values.to(model.dtype)
        features = model.backbone.forward_with_filtered_kwargs(pixel_values).feature_maps
        patch_height, patch_width = pixel_values.shape[2] // patch, pixel_values.shape[3] // patch
        hidden = model.neck(features, patch_height, patch_width)[model.head.head_in_index]
        head = model.head
        hidden = nn.functional.interpolate(head.conv1(hidden), (patch_height * patch, patch_width * patch), mode="bilinear",
                                           align_corners=True)
        depth = head.activation2(head.conv3(head.activation1(head.conv2(hidden)))) * head.max_depth
        return depth.squeeze(dim=1).float()


class ChunkedSelfAttention:
    """diffusers' AttnProcessor2_0 for the VAE's self-attention (its mid-blocks: one head over every
    latent pixel), the queries taken in `chunks` slices one after another. Each query's scores,
    softmax and output are the same numbers; a graph run holds 1/chunks of the [pixels x pixels]
    score matrix at a time: at 1536x1536, 340 MB in fp32 instead of 5.4 GB (twice: scores and
    softmax), which ONNX Runtime kept whole and the OOM killer ended. Scaling as the exporter lowers
    scaled_dot_product_attention (q and k each by head_dim ** -0.25: fp16 stays finite). The pixel
    count must be a multiple of `chunks`: latents of images in multiples of 64 are (8 x 8 | h x w)."""

    def __init__(self, chunks: int = 16):
        self.chunks = chunks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None \
                or hidden_states.ndim != 4 or attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError("ChunkedSelfAttention: only the VAE's plain self-attention over a feature map")
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        hidden = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        head_dim = key.shape[-1] // attn.heads

        def heads(tensor):  # [B, N, heads * d] -> [B, heads, N, d]
            return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        scale = head_dim ** -0.25
        keys = (heads(key) * scale).transpose(-1, -2)
        values = heads(value)
        queries = (heads(query) * scale).reshape(batch, attn.heads, self.chunks, -1, head_dim)
        slices = [torch.softmax(queries[:, :, i] @ keys, dim=-1) @ values for i in range(self.chunks)]
        hidden = torch.cat(slices, dim=2).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        hidden = hidden.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


@contextmanager
def chunked_attention(vae):
    """The VAE's attention processors swapped for ChunkedSelfAttention while the graph is traced
    (or the module runs), restored after: the pipeline's VAE is left as it was."""
    saved = getattr(vae, "attn_processors", None)
    if not saved:  # AutoencoderTiny: no attention
        yield
        return
    vae.set_attn_processor(ChunkedSelfAttention())
    try:
        yield
    finally:
        vae.set_attn_processor(saved)


class _VaeGraph(nn.Module):
    """A VAE and how its latents are scaled: x scaling_factor, or SDXL-style latents_mean/std when
    its config has them (as diffusers' pipelines do on both sides). Its attention runs chunked
    (ChunkedSelfAttention)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.has_latents_stats = mean is not None and std is not None
        if self.has_latents_stats:
            channels = config.latent_channels
            self.register_buffer("latents_mean", torch.tensor(mean).view(1, channels, 1, 1), persistent=False)
            self.register_buffer("latents_std", torch.tensor(std).view(1, channels, 1, 1), persistent=False)


class VaeDecoder(_VaeGraph):
    """Latents to displayable uint8 RGB (NHWC), exactly as the SDXL pipeline's decode + postprocess.

    Inside the graph: unscaling (`/ scaling_factor`, or SDXL-style latents_mean/std when the VAE
    config has them), decode, `VaeImageProcessor.denormalize` in the VAE's dtype, then fp32
    `* 255`, round half to even (numpy's and ONNX's Round) and uint8. Sound because every step is
    elementwise and exact in fp32; it sends 1 byte per pixel channel instead of 2-4 between
    models, and the endpoint's `images` come straight out of the graph.

    A VAE whose config says `force_upcast` (the original SDXL VAE overflows in fp16) decodes in
    fp32 whatever the input dtype, as diffusers does: keep it in fp32 with `vae.to(torch.float32)`.
    """

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype)
        if self.has_latents_stats:
            mean, std = self.latents_mean.to(latents.dtype), self.latents_std.to(latents.dtype)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        with chunked_attention(self.vae):
            image = self.vae.decode(latents, return_dict=False)[0]
        image = (image * 0.5 + 0.5).clamp(0, 1)
        # NHWC before the cast: TensorRT accepts UINT8 only at the network's edge, so the Cast to
        # uint8 must produce the output itself.
        return (image.float() * 255).round().permute(0, 2, 3, 1).to(torch.uint8)


class VaeEncoder(_VaeGraph):
    """uint8 RGB images (NHWC) to their latent distribution, exactly as the SDXL img2img and inpaint
    pipelines' preprocess + encode: `VaeImageProcessor` (fp32 `/ 255`, then `2x - 1`), the VAE's
    dtype, `AutoencoderKL.encode`'s DiagonalGaussianDistribution (mean, std = exp(logvar / 2), logvar
    clamped to [-30, 20]), both scaled as the pipelines scale the sampled latents (x scaling_factor,
    or SDXL-style latents_mean/std when the config has them). The loop samples mean + std * noise
    from each image's generator (serving/denoise.py): scaling before the sample instead of after it
    differs by rounding only. `dtype`: the export's (the outputs'), when a force_upcast VAE stays fp32.
    """

    def __init__(self, vae, dtype: torch.dtype | None = None):
        super().__init__(vae)
        self.dtype = dtype or vae.dtype

    def forward(self, images: torch.Tensor):
        # The Cast first: TensorRT takes UINT8 only at the network's edge, straight into a Cast.
        pixels = images.to(torch.float32).permute(0, 3, 1, 2) / 255.0
        pixels = (2.0 * pixels - 1.0).to(self.vae.dtype)
        with chunked_attention(self.vae):
            distribution = self.vae.encode(pixels, return_dict=False)[0]
        mean, std = distribution.mean, distribution.std
        if self.has_latents_stats:
            latents_mean, latents_std = self.latents_mean.to(mean.dtype), self.latents_std.to(mean.dtype)
            mean = (mean - latents_mean) * self.scaling_factor / latents_std
            std = std * self.scaling_factor / latents_std
        else:
            mean, std = mean * self.scaling_factor, std * self.scaling_factor
        return mean.to(self.dtype), std.to(self.dtype)


class SafetyCheckerGraph(nn.Module):
    """diffusers' StableDiffusionSafetyChecker.forward up to its cosine distances: CLIP's pooled vision
    output, the visual projection, then the cosine of the image embedding with each concept's and each
    special-care concept's embedding, cast to fp32 as diffusers casts them before scoring. The scoring
    (thresholds, rounding, the special-care adjustment: serving/safety.py) stays outside the graph."""

    def __init__(self, checker):
        super().__init__()
        self.checker = checker

    def forward(self, pixel_values: torch.Tensor):
        checker = self.checker
        pooled = checker.vision_model(pixel_values.to(checker.dtype))[1]
        embeds = nn.functional.normalize(checker.visual_projection(pooled))
        concept = embeds @ nn.functional.normalize(checker.concept_embeds).t()
        special = embeds @ nn.functional.normalize(checker.special_care_embeds).t()
        return concept.float(), special.float()


def build_module(name: str, pipe, dtype: torch.dtype | None = None) -> nn.Module:
    """The module for network `name` of a loaded pipeline, in eval mode. `dtype`: the export's, for
    the graphs whose outputs must carry it whatever their components' dtype (vae_encoder)."""
    if name == networks.TEXT_ENCODER.name:
        module = TextEncoders(pipe.text_encoder, pipe.text_encoder_2)
    elif name in (networks.UNET.name, networks.UNET_LORA.name, networks.UNET_CONTROL_NAME):
        module = UNet(pipe.unet)  # traced without, or with, the LoRA (and ControlNet) inputs
    elif name == networks.UNET_IP_NAME:  # with every per-request input: LoRAs, ControlNets, image tokens
        module = UNet(pipe.unet, ip_adapter=pipe.ip_adapter)
    elif name == networks.IMAGE_ENCODER.name:
        module = ImageEncoder(pipe.image_encoder, pipe.ip_adapter)
    elif name == networks.CONTROLNET_NAME:  # the stage's ControlNet
        module = ControlNet(pipe.controlnet)
    elif name == networks.UNION_CONTROLNET_NAME:  # the stage's ControlNet-Union
        module = UnionControlNet(pipe.union_controlnet)
    elif name == networks.DEPTH_ESTIMATOR.name:
        module = DepthEstimator(pipe.depth_estimator)
    elif name == networks.REFINER_UNET.name:  # the same wrapper: five time ids, bigG-only text
        module = UNet(pipe.refiner_unet, lora=False)
    elif name == networks.VAE_DECODER.name:
        module = VaeDecoder(pipe.vae)
    elif name == networks.VAE_ENCODER.name:
        module = VaeEncoder(pipe.vae, dtype)
    elif name == networks.PREVIEW_DECODER.name:
        # AutoencoderTiny has the decode, scaling_factor (1.0) and [-1, 1] output of AutoencoderKL,
        # and diffusers' pipelines decode with it the same way.
        module = VaeDecoder(pipe.preview_vae)
    elif name == networks.SAFETY_CHECKER.name:
        module = SafetyCheckerGraph(pipe.safety_checker)
    else:
        raise KeyError(f"unknown network {name!r}; known: {', '.join(networks.NETWORKS)}")
    return module.eval()
