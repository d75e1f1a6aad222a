"""TEST CODE: small denoisers written the way some released UNet codebases write theirs, which the TorchScript
tracer cannot export (an autograd.Function around attention, a convolution kernel computed at run time), and
models whose own forward raises."""
import torch
from torch import nn
import torch.nn.functional as F


class _Checkpointed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x):
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


class Att(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.out = nn.Conv1d(ch, ch, 1)

    def inner(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).reshape(b, c, -1)).chunk(3, dim=1)
        a = torch.softmax(torch.einsum("bct,bcs->bts", q * c ** -0.25, k * c ** -0.25), dim=-1)
        return x + self.out(torch.einsum("bts,bcs->bct", a, v)).reshape(b, c, h, w)

    def forward(self, x):
        return _Checkpointed.apply(self.inner, x)


class GuidedLike(nn.Module):
    def __init__(self, ch=32):
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.t = nn.Linear(1, ch)
        self.att = Att(ch)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.t(t.float()[:, None] / 1000)[:, :, None, None]
        return self.outc(self.att(h))


class RuntimeKernel(nn.Module):
    def __init__(self, ch=32):
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.register_buffer("k1", torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8)
        self.att = Att(ch)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x, t):
        h = self.inp(x)
        c = h.shape[1]
        kernel = (self.k1[None, :] * self.k1[:, None]).expand(c, 1, 4, 4)
        h = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="reflect"), kernel, stride=2, groups=c)
        h = Att.inner(self.att, h)
        return self.outc(self.up(h))


def guided():
    torch.manual_seed(0)
    return GuidedLike().eval()


def runtime_kernel():
    torch.manual_seed(0)
    return RuntimeKernel().eval()


class Broken(GuidedLike):
    def forward(self, x, t):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError("this model wants square images")
        return super().forward(x, t)


def broken():
    torch.manual_seed(0)
    return Broken().eval()


class AlwaysBroken(GuidedLike):
    def forward(self, x, t):
        return self.att.no_such_method(x)


def always_broken():
    return AlwaysBroken().eval()


class OneSize(nn.Module):
    """A learned position embedding of one size: the model serves 32x32 images only."""

    def __init__(self, ch=32, size=32):
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, ch, size, size) * 0.1)
        self.t = nn.Linear(1, ch)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.att = Att(ch)
        self.up = nn.Upsample(scale_factor=2)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.pos + self.t(t.float()[:, None] / 1000)[:, :, None, None]
        return self.outc(self.up(Att.inner(self.att, self.down(h))))


def one_size():
    torch.manual_seed(0)
    return OneSize().eval()


class QKVNewOrder(nn.Module):
    """guided-diffusion's QKVAttention (new order): √scale on q and on k, then a view that splits the heads."""

    def __init__(self, ch=64, heads=2):
        super().__init__()
        self.heads = heads
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.norm = nn.GroupNorm(8, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, ch, 1)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x)
        b, c, hh, ww = h.shape
        qkv = self.qkv(self.norm(h).reshape(b, c, -1))
        length = qkv.shape[-1]
        ch = c // self.heads
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / ch ** 0.25
        weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * self.heads, ch, length),
                              (k * scale).reshape(b * self.heads, ch, length))
        weight = torch.softmax(weight, dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(b * self.heads, ch, length))
        return self.outc(h + self.proj(a.reshape(b, -1, length)).reshape(b, c, hh, ww))


def qkv_new_order():
    torch.manual_seed(0)
    return QKVNewOrder().eval()


class CrossAttend(nn.Module):
    """Self-attention on the image, then cross-attention to a text context [B, 7, 48] (Stable Diffusion's layout)."""

    def __init__(self, ch=32, ctx=48, heads=2):
        super().__init__()
        self.heads = heads
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.self_qkv = nn.Linear(ch, 3 * ch)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(ctx, 2 * ch)
        self.temb = nn.Linear(1, ch)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def _attend(self, q, k, v):
        b, s, c = q.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, s, c)

    def forward(self, x, t, *, context):  # keyword-only, as diffusers' encoder_hidden_states is passed
        h = self.inp(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + self._attend(*self.self_qkv(seq).chunk(3, dim=-1))
        seq = seq + self._attend(self.q(seq), *self.kv(context).chunk(2, dim=-1))
        return self.outc(seq.transpose(1, 2).reshape(b, c, hh, ww))


def cross_attend():
    torch.manual_seed(0)
    model = CrossAttend().eval()
    with torch.no_grad():
        for p in model.parameters():  # attention that is not near-uniform
            p.mul_(1.5)
    return model


class NIN(nn.Module):
    """Score-SDE's network-in-network layer: a 1x1 linear map over channels, written as an einsum."""

    def __init__(self, cin, cout):
        super().__init__()
        self.W = nn.Parameter(torch.randn(cin, cout) * 0.2)
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return (torch.einsum("bhwc,co->bhwo", x.permute(0, 2, 3, 1), self.W) + self.b).permute(0, 3, 1, 2)


class SpatialAttention(nn.Module):
    """NCSN++'s attention: 5-D einsums over (h, w) x (i, j), a reshape that flattens the keys around the softmax."""

    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.q, self.k, self.v, self.out = NIN(ch, ch), NIN(ch, ch), NIN(ch, ch), NIN(ch, ch)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        logits = torch.einsum("bchw,bcij->bhwij", self.q(n), self.k(n)) * (int(c) ** (-0.5))
        weights = torch.softmax(torch.reshape(logits, (b, h, w, h * w)), dim=-1)
        out = torch.einsum("bhwij,bcij->bchw", torch.reshape(weights, (b, h, w, h, w)), self.v(n))
        return x + self.out(out)


class SpatialNet(nn.Module):
    def __init__(self, ch=32):
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.t = nn.Linear(1, ch)
        self.att = SpatialAttention(ch)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.att2 = SpatialAttention(ch)
        self.up = nn.Upsample(scale_factor=2)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.att(self.inp(x) + self.t(t.float()[:, None] / 1000)[:, :, None, None])
        return self.outc(self.up(self.att2(self.down(h))))


def spatial_net():
    torch.manual_seed(0)
    return SpatialNet().eval()


class IgnoresT(nn.Module):
    """A denoiser that never reads its timestep (an unconditional model kept to the (x, t) signature)."""

    def __init__(self, ch=32):
        super().__init__()
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.att = Att(ch)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        return self.outc(Att.inner(self.att, self.inp(x)))


def ignores_t():
    torch.manual_seed(0)
    return IgnoresT().eval()


class MaskedCross(nn.Module):
    """Cross-attention to a context [B, 7, 48] with a key-padding mask [B, 7] (True: attend), written three ways:
    SDPA's boolean ``attn_mask``, ``masked_fill(-inf)`` by hand, and an additive float mask by hand."""

    def __init__(self, style="sdpa", ch=32, ctx=48, heads=2):
        super().__init__()
        self.style, self.heads = style, heads
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(ctx, 2 * ch)
        self.temb = nn.Linear(1, ch)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def _attend(self, q, k, v, keep):
        b, s, c = q.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        keep = keep[:, None, None, :]
        if self.style == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            w = q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5
            if self.style == "masked_fill":
                w = w.masked_fill(~keep, float("-inf"))
            else:
                w = w + (1.0 - keep.float()) * -10000.0
            out = torch.softmax(w, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, s, c)

    def forward(self, x, t, *, context, context_mask):
        h = self.inp(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + self._attend(self.q(seq), *self.kv(context).chunk(2, dim=-1), context_mask)
        return self.outc(seq.transpose(1, 2).reshape(b, c, hh, ww))


def masked_cross(style="sdpa"):
    torch.manual_seed(0)
    model = MaskedCross(style).eval()
    with torch.no_grad():
        for p in model.parameters():  # attention that is not near-uniform, so a wrong mask shows
            p.mul_(2.0)
    return model


class TwoCross(CrossAttend):
    """Cross-attention twice: the second one's Q has read the context already (as deeper layers of an SD UNet do)."""

    def forward(self, x, t, *, context):
        h = self.inp(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        for _ in range(2):
            seq = seq + self._attend(self.q(seq), *self.kv(context).chunk(2, dim=-1))
        return self.outc(seq.transpose(1, 2).reshape(b, c, hh, ww))


def two_cross():
    torch.manual_seed(0)
    return TwoCross().eval()


def diffusers_sd(head_dim=8):
    """diffusers' UNet2DConditionModel in Stable Diffusion's layout, tiny: self- and cross-attention to a context
    [B, 77, 32] (from the test extra, not copied)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=head_dim, norm_num_groups=8).eval()


class MemoryKV(nn.Module):
    """Self-attention with 4 learned memory key/value pairs concatenated to the keys (as denoising-diffusion-pytorch's
    full attention does)."""

    def __init__(self, ch=32, heads=2, memory=4):
        super().__init__()
        self.heads = heads
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.mem = nn.Parameter(torch.randn(2, heads, memory, ch // heads))
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + t.float()[:, None, None, None] / 1000
        b, c, hh, ww = h.shape
        q, k, v = (z.reshape(b, self.heads, c // self.heads, hh * ww).transpose(-1, -2)
                   for z in self.qkv(h).chunk(3, dim=1))
        k = torch.cat([self.mem[0].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([self.mem[1].expand(b, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hh, ww)
        return self.outc(h + out)


def memory_kv():
    torch.manual_seed(0)
    return MemoryKV().eval()
