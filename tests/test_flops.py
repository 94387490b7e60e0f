import jax
import jax.numpy as jnp

from chipwise import flops
from chipwise.attention import reference
from chipwise.config import ModelConfig, load_config
from chipwise.presets import PRESETS
from chipwise.sharding import make_mesh, use_mesh
from chipwise.train.step import build_steps


def test_known_model_sizes():
    # Llama 2 7B has 6.74B parameters and Llama 3 8B 8.03B (their papers and model cards).
    assert abs(flops.param_count(ModelConfig(**PRESETS["llama2-7b"])) / 6.738e9 - 1) < 0.002
    assert abs(flops.param_count(ModelConfig(**PRESETS["llama3-8b"])) / 8.030e9 - 1) < 0.002
    assert abs(flops.param_count(ModelConfig(**PRESETS["llama3-70b"])) / 70.55e9 - 1) < 0.005


def test_causal_convention_halves_the_attention_term():
    cfg = ModelConfig(**PRESETS["llama3-8b"])
    causal, full = flops.training_flops_per_token(cfg, 8192), flops.training_flops_per_token(cfg, 8192, False)
    assert causal.matmul == full.matmul == 6 * flops.matmul_params(cfg)
    assert full.attention == 2 * causal.attention == 12 * 32 * 4096 * 8192


def test_matches_xla_cost_analysis_of_the_compiled_train_step():
    """XLA executes dense (non-causal) attention, so compare against the non-causal count. Layers unrolled: XLA's
    cost analysis counts a loop body (a scanned layer) once."""
    cfg = load_config(None, ["model.scan_layers=false",
                             "model.num_layers=2", "model.d_model=128", "model.num_heads=4", "model.num_kv_heads=2",
                             "model.d_ff=384", "model.vocab_size=512", "train.batch_size=4", "train.seq_len=64",
                             "train.dtype=float32"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    with use_mesh(mesh):
        steps = build_steps(cfg, mesh, reference.attend, jnp.float32)
        state = jax.eval_shape(steps.init)
        batch = jax.ShapeDtypeStruct((4, 65), jnp.int32)
        no_fault = jax.ShapeDtypeStruct((), jnp.float32)  # the step's NaN-injection input (0.0 in real runs)
        cost = steps.train.lower(state, batch, no_fault).compile().cost_analysis()
    xla = cost["flops"]
    ours = flops.training_flops_per_token(cfg.model, 64, causal=False).total * 4 * 64
    assert abs(xla / ours - 1) < 0.10, (xla, ours)
