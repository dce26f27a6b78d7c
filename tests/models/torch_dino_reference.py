"""PyTorch DINO ViT used as the test oracle, written from the public architecture.

Follows facebookresearch/dino ``vision_transformer.py`` (Caron et al., 2021): PatchEmbed
conv, CLS token, learned position embeddings resized by ``interpolate_pos_encoding``
(bicubic, scale factors (n + 0.1) / N, ``torch.nn.functional.interpolate``), pre-norm
blocks with LayerNorm(eps=1e-6), qkv with bias, nn.GELU (exact erf), final norm.
Written independently here (not imported) so the JAX port is checked against torch's
own kernels: conv2d, F.interpolate, softmax, layer_norm, gelu.
HASSOD / LOST / CutLER read the last block's keys with a forward hook on
``blocks[-1].attn.qkv``; ``features`` exposes the same tensors directly.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x), attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        y, attn = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, img_size=224):
        super().__init__()
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def randomize(self, seed):
        """Random weights with realistic scales (LayerNorm affine non-trivial too)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if (
                    name.endswith("norm1.weight")
                    or name.endswith("norm2.weight")
                    or (name == "norm.weight")
                ):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif name.endswith(".bias"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                elif name in ("cls_token", "pos_embed"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        return self

    def interpolate_pos_encoding(self, x, w, h):
        # DINO's code: w, h are the image's dims 2 and 3 (rows, columns).
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size
        h0 = h // self.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1
        side = int(math.sqrt(n))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        b, _, w, h = x.shape
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(b, -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens, w, h)

    @torch.no_grad()
    def features(self, images_nchw):
        """Returns k, q, v (B, h, w, D), cls_attn (B, heads, h, w), tokens (B, 1+hw, D)."""
        b, _, hh, ww = images_nchw.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        x = self.prepare_tokens(images_nchw)
        for blk in self.blocks[:-1]:
            x, _ = blk(x)
        last = self.blocks[-1]
        qkv_out = last.attn.qkv(last.norm1(x))  # what the forward hook sees
        x, attn = last(x)
        tokens = self.norm(x)
        d = tokens.shape[-1]
        q, k, v = (qkv_out[:, 1:, i * d : (i + 1) * d].reshape(b, h, w, d) for i in range(3))
        return {
            "q": q,
            "k": k,
            "v": v,
            "kqv": torch.cat([k, q, v], dim=-1),
            "cls_attn": attn[:, :, 0, 1:].reshape(b, self.num_heads, h, w),
            "tokens": tokens,
        }
