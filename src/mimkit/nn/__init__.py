"""Neural-network parts: ViT encoder, decoders, layers, position embeddings, patchify."""

from mimkit.nn.decoder import MAEDecoder
from mimkit.nn.layers import Attention, Block, CrossAttention, CrossBlock, DropPath, LayerScale, Mlp
from mimkit.nn.patch import gapped_patchify, norm_pix, patch_stats, patchify, unpatchify
from mimkit.nn.pos_embed import sincos_1d, sincos_2d
from mimkit.nn.vit import BlocksOutput, ViTConfig, ViTEncoder, gather_tokens

__all__ = [
    "MAEDecoder", "Attention", "Block", "CrossAttention", "CrossBlock", "DropPath", "LayerScale", "Mlp",
    "gapped_patchify", "norm_pix", "patch_stats", "patchify", "unpatchify", "sincos_1d", "sincos_2d",
    "BlocksOutput", "ViTConfig", "ViTEncoder", "gather_tokens",
]
