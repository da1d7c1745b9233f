"""CLIP's image tower as a frozen teacher encoder (CAE v2's target), built on timm's CLIP ViT.

Reading a CLIP checkpoint (OpenAI's TorchScript file, open_clip state dicts) is
:func:`mimkit.weights.read_clip_visual`; :meth:`ClipImageTower.from_state_dict` builds the tower from
the ``visual.*`` tensors it returns.
"""

from __future__ import annotations

import torch
from torch import nn


class ClipImageTower(nn.Module):
    """CLIP's image tower as a teacher (CAE v2's target): timm's CLIP ViT
    (``pre_norm``, QuickGELU as OpenAI's weights) whose ``forward_features`` applies ``ln_post`` to
    *every* token and then the visual projection: ``(B, 3, S, S) -> (B, 1+L, out_dim)``
    (``norm=False``: the last block's tokens, no ``ln_post``, no projection)."""

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, out_dim: int, quick_gelu: bool = True):
        super().__init__()
        import timm

        name = "vit_base_patch16_clip_quickgelu_224" if quick_gelu else "vit_base_patch16_clip_224"
        self.spec = {"kind": "clip", "img_size": img_size, "patch_size": patch_size, "width": width, "depth": depth,
                     "out_dim": out_dim, "quick_gelu": quick_gelu}
        self.model = timm.create_model(name, pretrained=False, img_size=img_size, patch_size=patch_size,
                                       embed_dim=width, depth=depth, num_heads=max(1, width // 64),
                                       num_classes=out_dim, global_pool="token")
        self.grid_size = (img_size // patch_size,) * 2
        self.patch_size, self.in_chans, self.out_dim = patch_size, 3, out_dim
        self.embed_dim, self.num_heads = width, max(1, width // 64)
        self.num_prefix_tokens, self.has_class_token = 1, True  # a class token, then the patch tokens

    @classmethod
    def from_state_dict(cls, sd: dict) -> ClipImageTower:
        """OpenAI-keyed ``visual.*`` tensors (:func:`read_clip_visual`) -> a tower holding them."""
        from timm.models.vision_transformer import _convert_openai_clip

        w = sd["visual.conv1.weight"]
        width, patch = w.shape[0], w.shape[-1]
        side = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
        tower = cls(side * patch, patch, width, depth, sd["visual.proj"].shape[1])
        tower.model.load_state_dict(_convert_openai_clip(sd, tower.model))
        return tower

    def teacher_spec(self) -> dict:
        return dict(self.spec)

    def forward_features(self, images: torch.Tensor, norm: bool = True) -> torch.Tensor:
        m = self.model
        if not norm:
            x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
            return m.blocks(x)
        return m.head(m.forward_features(images))  # ln_post on all tokens, then the projection


def teacher_encoder_from_spec(spec: dict) -> nn.Module:
    """Rebuild a teacher encoder (random weights) from its ``teacher_spec()`` (checkpoints)."""
    if spec.get("kind") == "clip":
        s = {k: v for k, v in spec.items() if k != "kind"}
        return ClipImageTower(**s)
    raise ValueError(f"unknown teacher kind {spec.get('kind')!r}")

