"""FLOPs per token: the one place chipwise counts model FLOPs (the trainer's MFU and the planner share it).

Convention (state it with every MFU figure):
  training FLOPs per token = 6 * N_matmul + 6 * L * (heads * head_dim) * S      ("causal")
where N_matmul counts the weights of every matrix multiply, the LM head included and the embedding lookup
excluded (a lookup multiplies nothing; a tied head is counted once, as the head), and the attention term counts
Q.K^T and A.V over the causal half of the S x S score matrix (on average a token attends to S/2 keys). The
factor 6 is 2 (multiply-add) x 3 (forward, plus backward for activations and for weights). Recomputation under
rematerialisation is not counted: this is MFU, not HFU.

How it compares (attention term per token; all agree on 6N up to which N):
  - llm.c, MaxText since July 2025: the same causal term.
  - nanoGPT, torchtitan, Levanter, MaxText before July 2025: 12 * L * H * Q * S, the full (non-causal) score
    matrix, so their MFU reads higher on long sequences. torchtitan also drops embedding-sized weights, and
    nanoGPT counts the tied head with the embedding (the same number).
  - The FLOPs XLA executes with dense attention are the non-causal count (`causal=False`).
"""

from __future__ import annotations

from dataclasses import dataclass

from chipwise.config import ModelConfig

CONVENTION = "6N+causal attn (LM head in, embeddings out, no remat)"


def layer_matmul_params(cfg: ModelConfig) -> int:
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o; k, v
    mlp = (3 if cfg.ffn == "swiglu" else 2) * cfg.d_model * cfg.d_ff
    return attn + mlp


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token: every layer plus the LM head."""
    return cfg.num_layers * layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size


def layer_param_count(cfg: ModelConfig) -> int:
    """Every parameter one block stores: its matmuls and its two norms."""
    return layer_matmul_params(cfg) + 2 * cfg.d_model


def param_count(cfg: ModelConfig) -> int:
    """Every parameter the model stores (embeddings and norms included, a tied head once)."""
    head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    return cfg.num_layers * layer_param_count(cfg) + cfg.vocab_size * cfg.d_model + head + cfg.d_model  # final norm


@dataclass(frozen=True)
class FlopsPerToken:
    matmul: float  # weights
    attention: float  # scores and weighted values

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> FlopsPerToken:
    attended = seq_len / 2 if causal else seq_len
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended
    return FlopsPerToken(matmul=2.0 * matmul_params(cfg), attention=float(attention))


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> FlopsPerToken:
    fwd = forward_flops_per_token(cfg, seq_len, causal)
    return FlopsPerToken(matmul=3 * fwd.matmul, attention=3 * fwd.attention)
