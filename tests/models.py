"""A small transformer-shaped model for the model-level tests, and bitsandbytes layers.

Attention with q/k/v/o projections, an MLP, LayerNorms, and an output head tied to the token
embedding: the shapes and module names of a decoder block, small enough to train in milliseconds.
``bnb_linear4bit``/``bnb_linear8bit`` build the quantized layers transformers' 4-bit/8-bit
loading produces, from a float ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        split = lambda t: t.view(batch, tokens, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(att.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.nn.functional.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token embedding -> blocks -> LayerNorm -> ``lm_head`` (weight tied to the embedding)."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def tiny_model(seed: int = 0, **kwargs: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**kwargs)


def tokens(seed: int = 1, batch: int = 2, length: int = 8, vocab: int = 50) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


# ---- bitsandbytes layers, as transformers' 4-bit / 8-bit loading builds them ----------------------
def bnb_linear4bit(linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` with ``linear``'s weight and bias, quantized (on the CPU).
    Quantizing is deterministic: two calls on one ``linear`` give the same bits. Keep
    ``in_features`` a multiple of ``blocksize`` where bitsandbytes' own forward is compared: its
    CPU kernel misreads blocks that span rows (docs/quantization.md)."""
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.float32, quant_type=quant_type,
    )
    module.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type, blocksize=blocksize
    )
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to("cpu")  # quantizes


def bnb_linear8bit(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes ``Linear8bitLt`` (int8 weight) with ``linear``'s weight and bias."""
    import bitsandbytes as bnb

    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 has_fp16_weights=False)
    module.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to("cpu")  # quantizes
