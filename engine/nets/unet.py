"""Class-conditional U-Net for epsilon prediction (Ho et al. 2020; Nichol & Dhariwal 2021), ONNX/TensorRT friendly."""

import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    """Widths and depths of the U-Net; JSON-serialisable (stored in checkpoints)."""

    in_channels: int = 1
    out_channels: int = 1
    image_size: int = 32
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    num_classes: int = 10  # 0 = unconditional; otherwise class id num_classes is the null class
    groups: int = 8
    head_channels: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w % self.groups for w in widths + [self.base_channels]):
            raise ValueError(f"channel widths {widths} must all be divisible by groups={self.groups}")
        if widths[-1] % self.head_channels:
            raise ValueError(f"bottom width {widths[-1]} must be divisible by head_channels={self.head_channels}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {down} for channel_mult {self.channel_mult}"
            )

    @property
    def null_class(self):
        return self.num_classes if self.num_classes > 0 else None

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data):
        """Build from a dict, naming unknown keys."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown UNetConfig keys {sorted(unknown)}; expected a subset of {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of the timestep index (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with the time/class embedding added in between (improved DDPM)."""

    def __init__(self, cin, cout, emb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over pixels as matmul + softmax (exports to plain ONNX ops)."""

    def __init__(self, channels, groups, head_channels):
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        n, c, h, w = x.shape
        d = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(n * self.heads, 3 * d, h * w)
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        weights = torch.softmax(torch.matmul(q.transpose(1, 2), k) * (d**-0.5), dim=-1)  # (nh, hw, hw)
        out = torch.matmul(v, weights.transpose(1, 2)).reshape(n, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """eps_theta(x_t, t, y): down path, attention at the lowest resolution, up path with skips."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        ch, g = config.base_channels, config.groups
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        widths = [ch * m for m in config.channel_mult]
        self.down, skips, cur = nn.ModuleList(), [ch], ch
        for level, w in enumerate(widths):
            for _ in range(config.num_res_blocks):
                self.down.append(ResBlock(cur, w, emb_dim, g, config.dropout))
                cur = w
                skips.append(cur)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock(cur, cur, emb_dim, g, config.dropout)
        self.mid_attn = Attention(cur, g, config.head_channels)
        self.mid2 = ResBlock(cur, cur, emb_dim, g, config.dropout)
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), w, emb_dim, g, config.dropout))
                cur = w
            if level > 0:
                self.up.append(Upsample(cur))
        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample, timestep, class_labels=None):
        emb = self.time_mlp(timestep_embedding(timestep, self.config.base_channels).to(sample.dtype))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full_like(timestep, self.config.num_classes)
            emb = emb + self.class_emb(class_labels)
        h = self.conv_in(sample)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (DDPM)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
