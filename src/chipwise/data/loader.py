"""Training batches from the packed tokens with Grain: shuffled windows, sharded by process, resumable; and a
weighted mixture of several token sets (data.mixture), drawn in exact proportions.

The batch stream is a pure function of (tokens, seq_len, global_batch, seed): step s uses positions
s*global_batch .. (s+1)*global_batch - 1 of an endless sequence of epochs, each epoch a different
permutation of all windows. Process p of P reads the contiguous rows p*global_batch/P .. of every
step, so the processes together see exactly what a single process would, whatever P is, and the
iterator state (the next step) means the same thing for any number of processes.
"""

from __future__ import annotations

import hashlib
import sys

import grain
import numpy as np

from chipwise.errors import DataError


class TokenWindows:
    """Random-access source: window i is tokens[i*seq_len : i*seq_len + seq_len + 1] (inputs and targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train"):
        if seq_len <= 0:
            raise DataError(f"train.seq_len must be positive, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.count = (len(tokens) - 1) // seq_len  # the +1 target token may overlap the next window
        if self.count <= 0:
            raise DataError(f"the {split} split has {len(tokens):,} tokens, fewer than train.seq_len + 1 = "
                            f"{seq_len + 1}; lower train.seq_len or add data")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        return {"tokens": np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)}


def _shuffle_seed(seed: int, part: str = "") -> int:
    # Grain shuffles epoch e with seed + e, so seeds 0 and 1 would share all but one epoch order;
    # hashing the user's seed first keeps different seeds' orders unrelated (and a mixture's parts' orders too).
    salt = f":{part}" if part else ""
    return int.from_bytes(hashlib.sha256(f"chipwise-order:{seed}{salt}".encode()).digest()[:4], "big")


MIXTURE_RESOLUTION = 10_000  # weights become integer shares of this: proportions exact to 0.01%


def mixture_shares(weights: list[float]) -> tuple[int, ...]:
    total = sum(weights)
    return tuple(max(1, round(w / total * MIXTURE_RESOLUTION)) for w in weights)


def mixture_counts(k: int, shares: tuple[int, ...]) -> list[int]:
    """How many of the first k mixed sequences each part gives. Part 0's sequences are spread evenly over the
    stream (a Bresenham line: position j is part 0's when floor(j * rest / total) steps), the others evenly over
    what is left, and so on; so every prefix, and every run of consecutive sequences, is within a sequence or two
    per part of the exact proportions."""
    out, remaining = [], sum(shares)
    for p in shares:
        rest = (k * (remaining - p)) // remaining
        out.append(k - rest)
        k, remaining = rest, remaining - p
    return out


class MixedWindows:
    """Random access to the mixed stream: sequence j is sequence `key` of part `i`'s own endless shuffled stream,
    where (i, key) follow from mixture_counts alone; so the mixture is a pure function of the position."""

    def __init__(self, parts: list, shares: tuple[int, ...]):
        self.parts, self.shares = parts, shares

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        before, after = mixture_counts(int(j), self.shares), mixture_counts(int(j) + 1, self.shares)
        i = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
        return {**self.parts[i][before[i]], "part": np.int32(i)}


class TrainIterator:
    """Iterator of {"tokens": int32 [global_batch // process_count, seq_len + 1]}, checkpointable."""

    def __init__(self, tokens, seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, worker_threads: int = 2,
                 mixture: list[tuple[str, float]] | None = None):
        """`tokens` is one token sequence, or with `mixture` [(name, weight)] one sequence per part, in order."""
        if global_batch <= 0 or process_count <= 0 or global_batch % process_count:
            raise DataError(f"train.batch_size ({global_batch}) must be a positive multiple of the "
                            f"number of processes ({process_count})")
        if not 0 <= process_index < process_count:
            raise DataError(f"process index {process_index} is outside 0..{process_count - 1}")
        self.spec = {"seq_len": seq_len, "global_batch": global_batch, "seed": seed}
        rows = global_batch // process_count
        self.mixture = mixture
        if mixture:
            self.spec["mixture"] = [[name, weight] for name, weight in mixture]
            self.shares = mixture_shares([w for _, w in mixture])
            parts = [grain.MapDataset.source(TokenWindows(t, seq_len, split=f"{name} train")).shuffle(
                seed=_shuffle_seed(seed, name)).repeat() for t, (name, _) in zip(tokens, mixture)]
            stream = grain.MapDataset.source(MixedWindows(parts, self.shares))
        else:
            stream = (grain.MapDataset.source(TokenWindows(tokens, seq_len))
                      .shuffle(seed=_shuffle_seed(seed))
                      .repeat())  # endless; grain reseeds the shuffle per epoch
        # drop_remainder: an endless stream has none, and grain would compute its length as ceil(len / rows) in
        # floating point, which for rows=1 rounds sys.maxsize up past what len() may return
        ds = (stream
              .batch(rows, drop_remainder=True)  # batch k holds stream positions k*rows .. (k+1)*rows - 1
              [process_index::process_count])  # so this process's k-th batch is its part of step k
        # Threads build upcoming batches while the step runs; results come back in index order, so
        # prefetching never changes what is returned.
        threads = max(0, worker_threads)
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads if threads else 0)
        self._iter = ds.to_iter_dataset(options).__iter__()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """JSON-serialisable: the next step's index plus the settings that give it meaning."""
        return {"step": int(self._iter.get_state()["next_index"]), **self.spec}

    def realised_mixture(self, position: int | None = None) -> dict[str, float] | None:
        """Each part's share of the sequences of the first `position` batches (default: all drawn so far), all
        processes together: exact, from the position alone."""
        if not self.mixture:
            return None
        batches = self.get_state()["step"] if position is None else position
        counts = mixture_counts(batches * self.spec["global_batch"], self.shares)
        total = max(1, sum(counts))
        return {name: c / total for (name, _), c in zip(self.mixture, counts)}

    def set_state(self, state: dict) -> None:
        changed = [k for k, v in self.spec.items() if state.get(k) != v]
        if changed:
            was = ", ".join(f"{k} {state.get(k)} -> {self.spec[k]}" for k in changed)
            raise DataError(f"cannot resume the data stream: {was} changed since the checkpoint; "
                            f"restore the original train settings or start a new run")
        self._iter.set_state({"next_index": int(state["step"])})


def eval_batches(val_tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list[dict]:
    """Fixed validation batches: windows spread evenly over the whole split, no shuffle.

    Spreading them (rather than taking the first windows) makes the estimate cover every validation document,
    not the two or three that happen to come first. A split with fewer windows than requested cycles through
    the windows it has, so the batch shape (and the compiled eval step) never changes.
    """
    windows = TokenWindows(val_tokens, seq_len, split="validation")
    count = max(1, min(num_batches, len(windows) // batch_size))
    wanted = count * batch_size
    if len(windows) >= wanted:
        picks = np.linspace(0, len(windows) - 1, wanted).round().astype(int)
    else:
        picks = np.arange(wanted) % len(windows)
    rows = np.stack([windows[i]["tokens"] for i in picks])
    return [{"tokens": rows[b * batch_size:(b + 1) * batch_size]} for b in range(count)]
