"""The mapping between chipwise's model and Hugging Face's Llama: config fields and parameter tensors.

Pure functions on numpy arrays and dicts, so both directions are tested against each other and against
`transformers` itself. No layout permutation of q/k is needed: chipwise's `rotary` rotates the two halves of
each head (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), which is exactly HF Llama's `rotate_half`, with the
same frequencies theta^(-2i/head_dim).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from chipwise.config import ModelConfig
from chipwise.errors import ChipwiseError
from chipwise.model import layer_params, stack_layers

ARCHITECTURE = "LlamaForCausalLM"


class HFFormatError(ChipwiseError):
    """A Hugging Face checkpoint chipwise cannot represent; the message names the field."""


def hf_config(m: ModelConfig, eos_id: int | None) -> dict:
    """config.json for a chipwise model (fp32 weights)."""
    if m.ffn != "swiglu":
        raise HFFormatError(f"cannot export: model.ffn is {m.ffn!r}, and Hugging Face Llama has only the SwiGLU "
                            f"feed-forward (hidden_act silu); only swiglu models can be exported")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings,
        # transformers 4.x reads rope_theta/rope_scaling; 5.x reads rope_parameters. Other tools (vLLM,
        # llama.cpp's converter) read either, so both are written.
        "rope_theta": m.rope_theta,
        "rope_scaling": rope_scaling(m),
        "rope_parameters": {"rope_type": m.rope_type, "rope_theta": m.rope_theta, **(rope_scaling(m) or {})},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos_id,  # chipwise has one special token: <|endoftext|> separates documents
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def rope_scaling(m: ModelConfig) -> dict | None:
    """config.json's rope_scaling for `m` (the Llama 3.1 form), or None for plain rotary embeddings."""
    if m.rope_type == "default":
        return None
    return {"rope_type": m.rope_type, "factor": m.rope_factor, "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_seq_len}


def _rope_fields(config: dict) -> dict:
    """ModelConfig's rope fields from rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x)."""
    for field in ("rope_scaling", "rope_parameters"):
        _require(config, field, lambda v: v is None or v.get("rope_type", v.get("type", "default")) in ROPE_TYPES,
                 f"chipwise implements the rotary embedding types {', '.join(ROPE_TYPES)}")
    scaling, parameters = config.get("rope_scaling") or {}, config.get("rope_parameters") or {}
    kinds = {d.get("rope_type", d.get("type", "default")) for d in (scaling, parameters) if d}
    _require(config, "rope_scaling", lambda _: len(kinds) <= 1, f"it disagrees with rope_parameters ({kinds})")
    rope = {**scaling, **parameters}
    kind = kinds.pop() if kinds else "default"
    fields = dict(rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))), rope_type=kind)
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            _require(rope, key, lambda v: isinstance(v, (int, float)) and v > 0,
                     f"rope_type llama3 needs a positive {key}")
        fields.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return fields


ROPE_TYPES = ("default", "llama3")


def _require(config: dict, field: str, ok, why: str):
    value = config.get(field)
    if not ok(value):
        raise HFFormatError(f"config.json field {field}={value!r} cannot be represented by chipwise: {why}")
    return value


def model_config(config: dict, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig for an HF Llama config.json, or a one-line error naming the field chipwise lacks."""
    archs = config.get("architectures") or [ARCHITECTURE]
    _require(config, "architectures", lambda _: archs == [ARCHITECTURE],
             f"only {ARCHITECTURE} is supported")
    _require(config, "model_type", lambda v: v in (None, "llama"), "only model_type 'llama' is supported")
    _require(config, "hidden_act", lambda v: v in (None, "silu"), "chipwise's gated feed-forward uses silu")
    _require(config, "attention_bias", lambda v: not v, "chipwise's attention projections have no bias")
    _require(config, "mlp_bias", lambda v: not v, "chipwise's feed-forward has no bias")
    _require(config, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel slicing of weights")
    rope = _rope_fields(config)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _require(config, field, lambda v: isinstance(v, int) and v > 0, "a positive integer is required")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    _require(config, "head_dim", lambda v: v is None or v * heads == d,
             f"chipwise's head size is hidden_size / num_attention_heads = {d / heads:g}")
    return ModelConfig(
        num_layers=config["num_hidden_layers"], d_model=d, num_heads=heads, num_kv_heads=kv,
        d_ff=config["intermediate_size"], vocab_size=config["vocab_size"], ffn="swiglu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), **rope,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq_len or int(config.get("max_position_embeddings") or 2048),
    )


# Where each Hugging Face tensor sits in chipwise's params, so that both directions can move one tensor (or one
# window of one) at a time. Layouts, chipwise's one-layer shape <-> HF's [out, in]:
#   same       the same array
#   transpose  [in, out] <-> [out, in]
#   heads_out  [d, heads, head_dim] <-> [heads * head_dim, d]   (q, k, v projections)
#   heads_in   [heads, head_dim, d] <-> [d, heads * head_dim]   (the output projection)
LAYER_TENSORS = (  # (path within a layer, HF name after "model.layers.{i}.", layout)
    (("attn_norm", "scale"), "input_layernorm.weight", "same"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "same"),
    (("attn", "wq"), "self_attn.q_proj.weight", "heads_out"),
    (("attn", "wk"), "self_attn.k_proj.weight", "heads_out"),
    (("attn", "wv"), "self_attn.v_proj.weight", "heads_out"),
    (("attn", "wo"), "self_attn.o_proj.weight", "heads_in"),
    (("mlp", "w_gate"), "mlp.gate_proj.weight", "transpose"),
    (("mlp", "w_up"), "mlp.up_proj.weight", "transpose"),
    (("mlp", "w_down"), "mlp.down_proj.weight", "transpose"),
)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One Hugging Face tensor and its place in chipwise's pure param dict: the leaf at `path` (unrolled layers:
    ("blocks", i, ...)), or, for a scanned model's stacked layers, entry `layer` of that leaf's leading axis.
    `shape` is chipwise's shape of it (one layer's)."""
    name: str
    path: tuple
    layer: int | None
    layout: str
    shape: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.shape
        if self.layout == "heads_out":
            return (s[1] * s[2], s[0])
        if self.layout == "heads_in":
            return (s[2], s[0] * s[1])
        return s[::-1] if self.layout == "transpose" else s


def hf_tensors(m: ModelConfig) -> list[HFTensor]:
    """Every tensor of the HF checkpoint of `m`, in to_hf_tensors' order."""
    d, f, h, kv, hd, v = m.d_model, m.d_ff, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size
    shapes = {("attn_norm", "scale"): (d,), ("mlp_norm", "scale"): (d,), ("attn", "wq"): (d, h, hd),
              ("attn", "wk"): (d, kv, hd), ("attn", "wv"): (d, kv, hd), ("attn", "wo"): (h, hd, d),
              ("mlp", "w_gate"): (d, f), ("mlp", "w_up"): (d, f), ("mlp", "w_down"): (f, d)}
    out = [HFTensor("model.embed_tokens.weight", ("embed",), None, "same", (v, d)),
           HFTensor("model.norm.weight", ("final_norm", "scale"), None, "same", (d,))]
    for i in range(m.num_layers):
        for path, suffix, layout in LAYER_TENSORS:
            where, layer = (("blocks", *path), i) if m.scanned else (("blocks", i, *path), None)
            out.append(HFTensor(f"model.layers.{i}.{suffix}", where, layer, layout, shapes[path]))
    if not m.tie_embeddings:
        out.append(HFTensor("lm_head.weight", ("lm_head",), None, "transpose", (d, v)))
    return out


def to_hf_layout(t: HFTensor, x: np.ndarray) -> np.ndarray:
    """One chipwise tensor (one layer's) in HF's layout: a view where numpy can make one."""
    if t.layout == "same":
        return x
    if t.layout == "transpose":
        return x.T
    return x.reshape(t.hf_shape[::-1]).T  # heads_out: [d, n * hd].T; heads_in: [n * hd, d].T


def hf_window(t: HFTensor, window: tuple[tuple[int, int], ...]):
    """(the window of HF's tensor holding chipwise's `window` of `t`, and the function that turns that HF block into
    chipwise's block). Windows are (start, stop) per dimension. The HF window is exactly what is asked, except that a
    window within a head's head_dim reads whole heads (head_dim is never sharded in chipwise's rules)."""
    if t.layout == "same":
        return window, lambda x: x
    if t.layout == "transpose":
        return window[::-1], lambda x: x.T
    hd = t.shape[1] if t.layout == "heads_in" else t.shape[2]
    if t.layout == "heads_out":  # [d, n, hd] from [n * hd, d]
        (d0, d1), (n0, n1), (h0, h1) = window
        return ((n0 * hd, n1 * hd), (d0, d1)), \
            lambda x: x.reshape(n1 - n0, hd, d1 - d0).transpose(2, 0, 1)[:, :, h0:h1]
    (n0, n1), (h0, h1), (d0, d1) = window  # heads_in: [n, hd, d] from [d, n * hd]
    return ((d0, d1), (n0 * hd, n1 * hd)), lambda x: x.reshape(d1 - d0, n1 - n0, hd).transpose(1, 2, 0)[:, h0:h1]


def to_hf_tensors(params: dict, m: ModelConfig) -> dict[str, np.ndarray]:
    """chipwise params (the pure dict of the NNX model) -> HF tensor names and [out, in] layouts."""
    d, h, kv, hd = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]["scale"]}
    for i in range(m.num_layers):
        b, p = layer_params(params, i, m), f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = b["attn_norm"]["scale"]
        out[p + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
        out[p + "self_attn.q_proj.weight"] = b["attn"]["wq"].reshape(d, h * hd).T
        out[p + "self_attn.k_proj.weight"] = b["attn"]["wk"].reshape(d, kv * hd).T
        out[p + "self_attn.v_proj.weight"] = b["attn"]["wv"].reshape(d, kv * hd).T
        out[p + "self_attn.o_proj.weight"] = b["attn"]["wo"].reshape(h * hd, d).T
        out[p + "mlp.gate_proj.weight"] = b["mlp"]["w_gate"].T
        out[p + "mlp.up_proj.weight"] = b["mlp"]["w_up"].T
        out[p + "mlp.down_proj.weight"] = b["mlp"]["w_down"].T
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"].T
    # Contiguous float32 copies: safetensors writes raw buffers, and transposes are views.
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {t.name: t.hf_shape for t in hf_tensors(m)}


def check_tensors(tensors: dict[str, tuple[int, ...]], m: ModelConfig) -> None:
    """Every tensor present with its shape, and none that chipwise would silently drop."""
    want = expected_shapes(m)
    extra = sorted(set(tensors) - set(want))
    # A tied checkpoint may still carry a copy of the head; it must equal the embedding (checked on load).
    extra = [k for k in extra if not (k == "lm_head.weight" and m.tie_embeddings)]
    if extra:
        raise HFFormatError(f"tensor {extra[0]} has no place in chipwise's model ({len(extra)} such tensors); "
                            f"only bias-free Llama weights can be imported")
    for name, shape in want.items():
        if name not in tensors:
            raise HFFormatError(f"tensor {name} is missing from the checkpoint")
        if tuple(tensors[name]) != shape:
            raise HFFormatError(f"tensor {name} has shape {tuple(tensors[name])}, config.json implies {shape}")


def from_hf_tensors(tensors: dict[str, np.ndarray], m: ModelConfig) -> dict:
    """HF tensors -> chipwise's pure param dict (float32), the inverse of to_hf_tensors."""
    check_tensors({k: v.shape for k, v in tensors.items()}, m)
    d, h, kv, hd = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim

    def t(name):
        return np.asarray(tensors[name], np.float32)

    blocks = {}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        blocks[i] = {
            "attn_norm": {"scale": t(p + "input_layernorm.weight")},
            "mlp_norm": {"scale": t(p + "post_attention_layernorm.weight")},
            "attn": {"wq": t(p + "self_attn.q_proj.weight").T.reshape(d, h, hd),
                     "wk": t(p + "self_attn.k_proj.weight").T.reshape(d, kv, hd),
                     "wv": t(p + "self_attn.v_proj.weight").T.reshape(d, kv, hd),
                     "wo": t(p + "self_attn.o_proj.weight").T.reshape(h, hd, d)},
            "mlp": {"w_gate": t(p + "mlp.gate_proj.weight").T, "w_up": t(p + "mlp.up_proj.weight").T,
                    "w_down": t(p + "mlp.down_proj.weight").T},
        }
    params = {"embed": t("model.embed_tokens.weight"),
              "blocks": stack_layers([blocks[i] for i in range(m.num_layers)]) if m.scanned else blocks,
              "final_norm": {"scale": t("model.norm.weight")}}
    if m.tie_embeddings:
        if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], params["embed"]):
            raise HFFormatError("config.json field tie_word_embeddings=True, but lm_head.weight differs from "
                                "model.embed_tokens.weight; set it to false to import an untied head")
    else:
        params["lm_head"] = t("lm_head.weight").T
    return _contiguous(params)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree)
