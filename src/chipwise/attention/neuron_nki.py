"""Trainium hook: the NKI flash-attention kernel through the Neuron JAX plugin (jax-neuronx).

Imported only on the `neuron` platform. It has not been run by chipwise's own tests (no Trainium here): until a
run on trn hardware checks it against the reference, the hook declines and the reference is used, with the
reason logged, so a run is never silently wrong.
"""


def unsupported_reason(*, platform, **_) -> str | None:
    if platform != "neuron":
        return f"needs AWS Trainium (the neuron platform), this is {platform}"
    import jax_neuronx  # noqa: F401  (raises ImportError without the Neuron plugin)

    return "the NKI kernel is not yet validated against the reference on Trainium hardware"


def attend(q, k, v, *, is_causal: bool, kv_lengths=None, segment_ids=None):  # pragma: no cover - never selected
    from chipwise.attention import reference

    return reference.attend(q, k, v, is_causal=is_causal, kv_lengths=kv_lengths, segment_ids=segment_ids)
