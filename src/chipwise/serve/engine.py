"""Continuous batching on the training model's code: a fixed number of decode slots, each with its own rows of one
KV cache, filled from a bounded queue as requests arrive and freed the moment one ends or its client goes away.

Every compiled program has a static shape, so one engine runs on CPUs, GPUs, TPUs and Trainium alike:
- `decode` feeds each decoding slot's newest token at that slot's own position (model.py's per-row cache) and
  picks its next token with that slot's own sampling settings (sample.pick_tokens). It runs only the slots that
  decode, in a program sized to the next power of two of their number (padded with idle slots, whose dummy token
  lands where their next real write will overwrite it), so a lone request pays for one row, not for every slot;
- `prefill` runs one chunk of one slot's prompt (`prefill_chunk` tokens) into that slot's cache rows, in place.
  One chunk runs between decode steps, so a long prompt never stalls the replies already streaming. A prompt's
  last (or only) chunk is padded to the smallest of a few bucket sizes (powers of two up to `prefill_chunk`)
  that holds it: a short prompt costs a short program, and there are still only a handful of shapes to compile.

The scheduler runs on one thread that owns the device; requests arrive from any thread (`submit`) and receive
their text through a callback (`Request.on_event`), which the HTTP server hands to its event loop.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from chipwise import prng
from chipwise.dots import matmul
from chipwise.model import SlotPositions
from chipwise.sample import pick_tokens
from chipwise.serve.model_source import ServedModel
from chipwise.serve.text import TextStream
from chipwise.sharding import logical_to_spec, use_mesh


class QueueFull(Exception):
    """The bounded queue of waiting requests is full: the server answers 429."""


class NotAccepting(Exception):
    """The engine is draining (SIGTERM) or stopped: the server answers 503."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings, which it does not include
    ignore_eos: bool = False  # keep generating past EOS (load generators force output lengths this way)


@dataclass
class Event:
    """What a request's consumer receives: new text (and its token ids) and, on the last event, why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    on_event: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False  # set from any thread (client gone); the scheduler frees the slot at its next step
    finish_reason: str | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    seed: int = 0
    text: TextStream | None = None


class Engine:
    def __init__(self, served: ServedModel, *, slots: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int = 256, max_queue: int = 256, dtype=jnp.float32, mesh=None, shardings=None):
        model = nnx.merge(served.graphdef, served.params)
        self.config = model.cfg
        self.served = served
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self.chunk = min(prefill_chunk, self.max_seq_len)
        self.num_slots, self.max_queue, self.dtype = slots, max_queue, dtype
        # Chunks start at multiples of `chunk` and the cache is a whole number of chunks long, so a padded last
        # chunk never runs past the end (dynamic_update_slice would move it back over real entries).
        self.cache_len = math.ceil(self.max_seq_len / self.chunk) * self.chunk
        self.buckets = sorted({min(2 ** k, self.chunk) for k in range(4, max(self.chunk.bit_length(), 4) + 1)})
        # How much of the cache a step reads: the smallest of these that holds every row's tokens. Attention then
        # costs what the requests use, not the whole context (8k positions for a model that allows 8k).
        self.windows = sorted({min(2 ** k, self.cache_len) for k in range(7, self.cache_len.bit_length() + 1)})
        # How many slots a decode program runs: the smallest of these that holds every decoding slot.
        self.row_counts = sorted({min(2 ** k, slots) for k in range(slots.bit_length() + 1)})
        cast = jax.tree.map(lambda p: jnp.asarray(p, dtype), served.params)
        self.params = cast if shardings is None else jax.device_put(cast, shardings)
        # The LM head as its own [d_model, vocab] array. Tied to the embedding, the head is the embedding's transpose,
        # which XLA:CPU otherwise copies out in full (113 MB for SmolLM2-135M) in every prefill and decode step.
        head = jnp.asarray(model.head(), dtype)
        self.head = head if mesh is None else jax.device_put(head, NamedSharding(
            mesh, logical_to_spec(("embed", "vocab"), head.shape, mesh)))
        self.cache = model.init_cache(slots, self.cache_len, dtype)
        self.mesh = mesh
        if mesh is not None:  # each device holds its KV heads' share of every slot, as the attention reads it
            axes = ("layers",) * self.config.scanned + ("batch", "seq", "kv_heads", "head_dim")
            self.cache = jax.device_put(self.cache, jax.tree.map(
                lambda c: NamedSharding(mesh, logical_to_spec(axes, c.shape, mesh)), self.cache))
        self.slots: list[Request | None] = [None] * slots
        self.queue: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.accepting, self.running = True, False
        self.thread: threading.Thread | None = None
        self.decode_steps = self.prefill_chunks = 0

    # ---- the caller's side (any thread)

    def check_fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request cannot be served (a sentence for a 400 reply), or None."""
        if prompt_len == 0:
            return "the prompt is empty"
        if prompt_len + max_tokens > self.max_seq_len:
            return (f"this model's maximum context length is {self.max_seq_len} tokens, but {prompt_len + max_tokens} "
                    f"were requested ({prompt_len} in the prompt, {max_tokens} to generate); shorten the prompt "
                    f"or lower max_tokens")
        return None

    def submit(self, request: Request) -> None:
        problem = self.check_fits(len(request.prompt_ids), request.sampling.max_tokens)
        if problem:
            raise ValueError(problem)
        request.seed = (request.sampling.seed if request.sampling.seed is not None
                        else int.from_bytes(os.urandom(4), "little") >> 1) & 0x7FFFFFFF
        request.text = TextStream(self.served.tokenizer, request.sampling.stop)
        with self.cond:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting; retry later")
            self.queue.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def stats(self) -> dict:
        busy = [r for r in self.slots if r is not None]
        return {"queued": len(self.queue), "slots": self.num_slots, "slots_busy": len(busy),
                "kv_tokens": sum(r.prefilled + max(len(r.output_ids) - 1, 0) for r in busy),
                "kv_capacity": self.num_slots * self.cache_len}

    def start(self) -> "Engine":
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="chipwise-engine", daemon=True)
        self.thread.start()
        return self

    def stop_accepting(self) -> None:
        with self.cond:
            self.accepting = False
            self.cond.notify()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with `drain`, finish every request already submitted, else abort them; then stop."""
        with self.cond:
            self.accepting = False
            if not drain:
                for r in [*self.queue, *(s for s in self.slots if s is not None)]:
                    r.cancelled = True
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def warm_up(self) -> None:
        """Compile both programs now, not on the first request (a greedy and a sampling decode step)."""
        with self._on_mesh():
            for size in self.buckets:  # a whole prompt of each size (longer ones compile on first use)
                self._run_prefill(0, [0] * size, 0)
            for size in self.row_counts:
                zeros, rows = np.zeros(size, np.int32), np.arange(size, dtype=np.int32)
                for window in self.windows:
                    for sampled in (False, True):
                        self._run_decode(rows, zeros, zeros + window - 1, [None] * size, sampled)

    def _on_mesh(self):
        """Trace and run under the tensor-parallel mesh, where there is one (the sharding hints need it)."""
        return use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ---- the scheduler (the engine thread)

    def _loop(self) -> None:
        with self._on_mesh():
            self._serve_until_stopped()

    def _serve_until_stopped(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.queue and all(s is None for s in self.slots):
                    self.cond.wait()
                if not self.running and not self.queue and all(s is None for s in self.slots):
                    return
            self.step()

    def step(self) -> None:
        """One round: free what was cancelled, admit what waits, one prefill chunk, one decode step."""
        with self.cond:
            for i, r in enumerate(self.slots):
                if r is not None and r.cancelled:
                    self._finish(i, "abort")
            for r in [r for r in self.queue if r.cancelled]:
                self.queue.remove(r)
            for i in range(self.num_slots):
                if self.slots[i] is None and self.queue:
                    self.slots[i] = self.queue.popleft()
        waiting = [i for i, r in enumerate(self.slots) if r is not None and r.prefilled < len(r.prompt_ids)]
        if waiting:  # the longest-waiting prompt first
            self._prefill_step(min(waiting, key=lambda i: self.slots[i].arrival))
        if any(r is not None and r.output_ids for r in self.slots):
            self._decode_step()

    def _prefill_step(self, i: int) -> None:
        r = self.slots[i]
        start = r.prefilled
        chunk = r.prompt_ids[start: start + self.chunk]
        token = self._run_prefill(i, chunk, start, r)
        r.prefilled += len(chunk)
        self.prefill_chunks += 1
        if r.prefilled == len(r.prompt_ids):  # the prompt's last logits give the first token
            self._accept(i, token)

    def _decode_step(self) -> None:
        decoding = [i for i, r in enumerate(self.slots) if r is not None and r.output_ids]
        # Pad to the next of the programs' sizes with slots that are not decoding: their dummy token lands where
        # their next real write goes (an empty slot's position 0, a half-prefilled prompt's next chunk).
        size = next(n for n in self.row_counts if n >= len(decoding))
        rows = decoding + [i for i in range(self.num_slots) if i not in decoding][: size - len(decoding)]
        tokens, positions = np.zeros(size, np.int32), np.zeros(size, np.int32)
        for j, i in enumerate(rows):
            r = self.slots[i]
            if i in decoding:  # the newest token at its position: prompt + earlier outputs come before it
                tokens[j], positions[j] = r.output_ids[-1], len(r.prompt_ids) + len(r.output_ids) - 1
            elif r is not None:
                positions[j] = r.prefilled
        requests = [self.slots[i] if i in decoding else None for i in rows]
        sampled = any(r is not None and r.sampling.temperature > 0 for r in requests)
        out = self._run_decode(np.asarray(rows, np.int32), tokens, positions, requests, sampled)
        self.decode_steps += 1
        for j, i in enumerate(decoding):
            self._accept(i, int(out[j]))

    def _accept(self, i: int, token: int) -> None:
        """Slot i produced `token`: pass its text on, and end the request if it is done."""
        r = self.slots[i]
        r.output_ids.append(token)
        s = r.sampling
        if token in self.served.eos_ids and not s.ignore_eos:
            return self._finish(i, "stop", drop_last=True)
        text, stopped = r.text.add(token)
        if stopped:
            return self._finish(i, "stop", pending=text)
        if len(r.output_ids) >= s.max_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.max_seq_len:
            return self._finish(i, "length", pending=text)
        if text:
            r.on_event(Event(text, [token]))

    def _finish(self, i: int, reason: str, pending: str = "", drop_last: bool = False) -> None:
        r = self.slots[i]
        self.slots[i] = None
        r.finish_reason = reason
        if reason != "abort":
            pending += r.text.flush()
        ids = [] if drop_last or not r.output_ids else [r.output_ids[-1]]
        r.on_event(Event(pending, ids, reason))

    # ---- the device programs

    def _sampling_arrays(self, rows: list[Request | None]):
        def col(get, dtype):
            return np.array([0 if r is None else get(r) for r in rows], dtype)
        return (col(lambda r: r.sampling.temperature, np.float32), col(lambda r: r.sampling.top_k, np.int32),
                col(lambda r: r.sampling.top_p if r.sampling.top_p > 0 else 1.0, np.float32),
                col(lambda r: r.seed, np.int32), col(lambda r: len(r.output_ids), np.int32))

    def _run_prefill(self, slot: int, chunk: list[int], start: int, request: Request | None = None) -> int:
        tokens = np.zeros((1, next(b for b in self.buckets if b >= len(chunk))), np.int32)
        tokens[0, : len(chunk)] = chunk
        sampling = self._sampling_arrays([request])
        self.cache, token = _prefill(self.served.graphdef, self.params, self.head, self.cache, jnp.int32(slot),
                                     tokens, jnp.int32(start), jnp.int32(len(chunk) - 1), *sampling, dtype=self.dtype,
                                     sampled=request is not None and request.sampling.temperature > 0,
                                     visible=self._window(start + tokens.shape[1]))
        return int(token[0])

    def _run_decode(self, rows, tokens, positions, requests, sampled: bool):
        self.cache, out = _decode(self.served.graphdef, self.params, self.head, self.cache, rows, tokens, positions,
                                  *self._sampling_arrays(requests), dtype=self.dtype, sampled=sampled,
                                  visible=self._window(int(positions.max()) + 1))
        return np.asarray(out)

    def _window(self, length: int) -> int:
        return next(w for w in self.windows if w >= length)


def _pick(logits, temperature, top_k, top_p, seeds, counters, sampled: bool):
    """Each row's next token; the key of a request's n-th token depends on its seed and n alone, so a reply is the
    same whichever slot it ran in and whatever ran beside it."""
    if not sampled:  # every row greedy: skip the vocabulary sort (a host-side choice between two programs)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(prng.sampling_key)(seeds, counters)
    return pick_tokens(logits, temperature, top_k, top_p, keys)


@partial(jax.jit, static_argnames=("graphdef", "dtype", "sampled", "visible"), donate_argnames=("cache",))
def _prefill(graphdef, params, head, cache, slot, tokens, start, last, temperature, top_k, top_p, seeds, counters, *,
             dtype, sampled, visible):
    """One chunk tokens [1, chunk] of the prompt in `slot`, from position `start`, written into that slot's cache
    rows in place; and the token the logits after position start + `last` pick."""
    model = nnx.merge(graphdef, params)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    x, cache = model.hidden(tokens, dtype=dtype, positions=positions, caches=cache,
                            cache_start=SlotPositions(start[None], visible, slot[None]))
    logits = matmul(x[0, last][None], head, dtype, out_dtype=jnp.float32)
    return cache, _pick(logits, temperature, top_k, top_p, seeds, counters, sampled)


@partial(jax.jit, static_argnames=("graphdef", "dtype", "sampled", "visible"), donate_argnames=("cache",))
def _decode(graphdef, params, head, cache, rows, tokens, positions, temperature, top_k, top_p, seeds, counters, *,
            dtype, sampled, visible):
    """The slots `rows` [n] feed tokens[j] at positions[j] -> each one's next token [n]. A program per n (a few
    sizes), so a lone request pays for one row, not for every slot."""
    model = nnx.merge(graphdef, params)
    x, cache = model.hidden(tokens[:, None], dtype=dtype, positions=positions[:, None], caches=cache,
                            cache_start=SlotPositions(positions, visible, rows))
    logits = matmul(x[:, 0], head, dtype, out_dtype=jnp.float32)
    return cache, _pick(logits, temperature, top_k, top_p, seeds, counters, sampled)
