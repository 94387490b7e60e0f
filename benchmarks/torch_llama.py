"""The chipwise architecture in idiomatic PyTorch, as the baseline of `benchmarks/train_step.py`.

Same model as `src/chipwise/model.py`: token embedding, pre-norm blocks (RMSNorm normalising in fp32, rotary
embeddings pairing the two halves of each head, grouped-query attention through
`scaled_dot_product_attention`, SwiGLU or GELU MLP), a final RMSNorm and a tied or untied LM head, no biases.
Weights start as chipwise's do (truncated normal, std 1/sqrt(fan_in), the residual-stream output projections
further scaled by 1/sqrt(2 * layers); norms at one), and the optimizer is chipwise's AdamW: the same betas, eps,
decoupled weight decay on matrices only (not the embedding), global gradient clipping and learning-rate schedule.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chipwise.model import layer_params, rope_frequencies

# `enable_gqa` arrived in torch 2.5; before that K/V heads are repeated by hand.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _init_(weight: torch.Tensor, fan_in: int, scale: float = 1.0) -> None:
    std = scale * fan_in ** -0.5
    nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in fp32 whatever the compute dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)


class Rotary(nn.Module):
    """Rotary embeddings on [batch, heads, seq, head_dim]; each pair is (x[i], x[i + head_dim/2])."""

    def __init__(self, cfg):
        super().__init__()
        freqs = torch.tensor(rope_frequencies(cfg), dtype=torch.float32)  # chipwise's, Llama 3.1 scaling included
        max_seq_len = cfg.max_seq_len
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)  # [max_seq, half]
        # Buffers, not parameters, and not saved: they are a function of the config.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[-2]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, rotary: Rotary):
        super().__init__()
        d, self.h, self.kv, self.hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(d, self.h * self.hd, bias=False)
        self.wk = nn.Linear(d, self.kv * self.hd, bias=False)
        self.wv = nn.Linear(d, self.kv * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, d, bias=False)
        for w in (self.wq, self.wk, self.wv):
            _init_(w.weight, d)
        _init_(self.wo.weight, self.h * self.hd, (2 * cfg.num_layers) ** -0.5)  # residual outputs shrink with depth
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.rotary(self.wq(x).view(b, t, self.h, self.hd).transpose(1, 2))
        k = self.rotary(self.wk(x).view(b, t, self.kv, self.hd).transpose(1, 2))
        v = self.wv(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.kv == self.h:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif _SDPA_GQA:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # query head i reads K/V head i // (heads / kv_heads), as enable_gqa does
            groups = self.h // self.kv
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                                 v.repeat_interleave(groups, dim=1), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.d_model, cfg.d_ff
        self.gated = cfg.ffn == "swiglu"
        self.w_gate = nn.Linear(d, f, bias=False) if self.gated else None
        self.w_up = nn.Linear(d, f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)
        for w in (self.w_gate, self.w_up):
            if w is not None:
                _init_(w.weight, d)
        _init_(self.w_down.weight, f, (2 * cfg.num_layers) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.w_up(x)
        # jax.nn.gelu defaults to the tanh approximation.
        h = F.silu(self.w_gate(x)) * up if self.gated else F.gelu(up, approximate="tanh")
        return self.w_down(h)


class Block(nn.Module):
    def __init__(self, cfg, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rotary)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Built from a chipwise `ModelConfig`; `forward(tokens)` gives logits, `forward(tokens, targets)` the loss."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        _init_(self.embed.weight, cfg.d_model)  # unit-norm rows: a tied head starts near uniform
        rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            _init_(self.lm_head.weight, cfg.d_model)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is one Parameter, counted once

    @torch.no_grad()
    def load_chipwise(self, params) -> None:
        """Copy a chipwise parameter tree (`nnx.to_pure_dict` of the model; arrays) into this model."""
        def put(dst: torch.Tensor, src, transpose: bool = False):
            src = torch.tensor(np.asarray(src), dtype=dst.dtype)
            dst.copy_(src.T if transpose else src)

        put(self.embed.weight, params["embed"])
        for i, block in enumerate(self.blocks):
            p = layer_params(params, i, self.cfg)
            put(block.attn_norm.weight, p["attn_norm"]["scale"])
            put(block.mlp_norm.weight, p["mlp_norm"]["scale"])
            for name in ("wq", "wk", "wv"):  # [d, heads, head_dim] -> Linear [heads * head_dim, d]
                w = np.asarray(p["attn"][name])
                put(getattr(block.attn, name).weight, w.reshape(w.shape[0], -1), transpose=True)
            wo = np.asarray(p["attn"]["wo"])  # [heads, head_dim, d] -> Linear [d, heads * head_dim]
            put(block.attn.wo.weight, wo.reshape(-1, wo.shape[-1]), transpose=True)
            for name in ("w_gate", "w_up", "w_down"):
                if name in p["mlp"]:
                    put(getattr(block.mlp, name).weight, p["mlp"][name], transpose=True)
        put(self.final_norm.weight, params["final_norm"]["scale"])
        if not self.cfg.tie_embeddings:
            put(self.lm_head.weight, params["lm_head"], transpose=True)


def make_optimizer(model: Llama, train_cfg, schedule: Callable[[int], float] | None = None):
    """AdamW as chipwise configures it; `schedule(step)` gives the learning rate (constant `lr` if None). On a GPU
    it is PyTorch's fused AdamW, the fastest it has (one kernel for every parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        wants = p.ndim >= 2 and p is not model.embed.weight
        (decay if wants or train_cfg.decay_norms_and_embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_gpu = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                            eps=train_cfg.adam_eps, fused=True if on_gpu else None)
    sched = None
    if schedule is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule(step) / train_cfg.lr)
    return opt, sched


def train_step(loss_fn: Callable, model: Llama, opt, sched, tokens: torch.Tensor, grad_clip: float,
               autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimizer step on tokens [batch, seq+1]; `loss_fn` is the model or its torch.compile'd form.
    `autocast_dtype` (bf16) runs the forward pass under autocast over fp32 master weights, as chipwise's bf16 does."""
    with torch.autocast(tokens.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = loss_fn(tokens[:, :-1], tokens[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
    return loss.detach()


def expected_initial_loss(vocab_size: int) -> float:
    """Cross-entropy of a uniform prediction, which an untrained model should be near."""
    return math.log(vocab_size)
