"""A small real causal transformer that generates with a KV cache and continuous batching.

:class:`TorchEngine` keeps ``num_slots`` sequences in a per-slot KV cache. Each :meth:`TorchEngine.step` first
prefills queued requests into free slots (prompt plus any partial response being resumed, so a resumed row
continues exactly where it stopped), then decodes one token for every other busy slot in one batched forward.
Decoding is greedy (``temperature=0``) or sampled with Gumbel noise that is a hash of (seed, sample id,
position), so an aborted and resumed row draws the same tokens as an uninterrupted one.

The weights are random (seeded), so the model never learns when to stop. To benchmark a controlled long tail,
leave ``eos_token_id=None`` (EOS disabled) and give each request a ``max_new_tokens`` drawn from a long-tailed
distribution (e.g. ``Scheduler(max_tokens=LengthDistribution(...))``): every row then generates exactly its
drawn length. Runs on CPU or CUDA (``device``); ``clock`` is wall time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from pr_loader.errors import ConfigError, EngineError
from pr_loader.rollout.engine import (
    FinishReason,
    GenOutput,
    GenRequest,
    SlotEngine,
    SlotSpan,
    hash_key,
    splitmix64,
    unit_floats,
)


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the transformer."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 1024

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.max_seq_len) < 1:
            raise ConfigError(f"every TinyConfig field must be >= 1: {self}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.up = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.down = nn.Linear(4 * cfg.dim, cfg.dim)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        shape = (b, t, self.n_heads, d // self.n_heads)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def _finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = att.shape
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        out: torch.Tensor = x + self.down(functional.gelu(self.up(self.ln2(x))))
        return out

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal self-attention over whole sequences [B, T, D]; also returns k, v [B, H, T, hd]."""
        q, k, v = self._heads(x)
        return self._finish(x, functional.scaled_dot_product_attention(q, k, v, is_causal=True)), k, v

    def cached(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row [N, 1, D] attending to cached keys/values [N, H, L, hd] under ``mask``."""
        q, _, _ = self._heads(x)
        return self._finish(x, functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask))


class TinyTransformer(nn.Module):
    """A GPT-style decoder with learned positions; weights drawn from ``seed`` (global RNG untouched)."""

    def __init__(self, cfg: TinyConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif "ln" in name:
                    param.fill_(1.0)
                elif param.dim() == 2 and not name.startswith(("tok", "pos")):
                    param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=gen)
                else:
                    param.normal_(0.0, 1.0, generator=gen)

    @property
    def layers(self) -> list[_Block]:
        """The transformer blocks, typed."""
        return cast(list[_Block], list(self.blocks))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of a full causal forward over ``tokens`` [B, T] (no cache)."""
        return self.forward_with_kv(tokens)[0]

    def forward_with_kv(
        self, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Full forward returning logits and each layer's keys/values."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        kv = []
        for block in self.layers:
            x, k, v = block.full(x)
            kv.append((k, v))
        return self.head(self.ln_f(x)), kv

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor, span: int
    ) -> torch.Tensor:
        """Logits [N, V] for one token per row at ``positions`` (all < ``span``); caches their keys/values."""
        x = (self.tok(tokens) + self.pos(positions)).unsqueeze(1)
        mask = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        for layer, block in enumerate(self.layers):
            _, k, v = block._heads(x)
            cache.keys[layer][slots, :, positions] = k[:, :, 0]
            cache.values[layer][slots, :, positions] = v[:, :, 0]
            x = block.cached(
                x, cache.keys[layer][slots, :, :span], cache.values[layer][slots, :, :span], mask
            )
        logits: torch.Tensor = self.head(self.ln_f(x))[:, 0]
        return logits


@dataclass
class KVCache:
    """Per-layer key/value tensors [slots, heads, max_seq_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: TinyConfig, slots: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (slots, cfg.n_heads, cfg.max_seq_len, cfg.dim // cfg.n_heads)
        make = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2 * cfg.n_layers)]
        return cls(make[: cfg.n_layers], make[cfg.n_layers :])


@dataclass
class _Running:
    req: GenRequest
    start: float
    length: int  # context tokens already in the cache
    key: int  # hash key for sampling noise
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class TorchEngine(SlotEngine):
    """Real token-by-token generation with a KV cache and continuous batching (see module docstring)."""

    def __init__(
        self,
        config: TinyConfig | None = None,
        *,
        num_slots: int = 16,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
    ) -> None:
        self.config = config or TinyConfig()
        if num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, got {num_slots}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if eos_token_id is not None and not 0 <= eos_token_id < self.config.vocab_size:
            raise ConfigError(f"eos_token_id {eos_token_id} is outside the vocabulary")
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.eos_token_id = eos_token_id
        self.model = TinyTransformer(self.config, seed=seed).to(device=self.device, dtype=dtype).eval()
        self.cache = KVCache.empty(self.config, num_slots, self.device, dtype)
        super().__init__(num_slots)
        self._slots: list[_Running | None] = [None] * num_slots
        self._t0 = time.perf_counter()

    @property
    def clock(self) -> float:
        """Wall seconds since the engine was created (device work synchronised)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self._t0

    def submit(self, requests: Sequence[GenRequest]) -> None:
        """Queue requests (FIFO); EngineError if a request cannot fit the model."""
        cfg = self.config
        for req in requests:
            ctx = np.concatenate([req.prompt_ids, req.prefix_ids])
            if ctx.size == 0:
                raise EngineError(f"request {req.request_id!r} has an empty prompt")
            if ctx.min() < 0 or ctx.max() >= cfg.vocab_size:
                raise EngineError(f"request {req.request_id!r} has token ids outside [0, {cfg.vocab_size})")
            if ctx.size + req.max_new_tokens > cfg.max_seq_len:
                raise EngineError(
                    f"request {req.request_id!r} needs {ctx.size + req.max_new_tokens} positions, "
                    f"max_seq_len is {cfg.max_seq_len}"
                )
        self._book.add(requests)
        self._waiting.extend(requests)

    def _choose(self, logits: torch.Tensor, runs: Sequence[_Running]) -> tuple[list[int], list[float]]:
        logits = logits.float()
        if self.temperature > 0:
            logits = logits / self.temperature
            noise = self._gumbel(runs)
            choice = torch.argmax(logits + torch.from_numpy(noise).to(logits.device), dim=-1)
        else:
            choice = torch.argmax(logits, dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, choice[:, None])[:, 0]
        return [int(t) for t in choice.tolist()], [float(x) for x in logprobs.tolist()]

    def _gumbel(self, runs: Sequence[_Running]) -> np.ndarray:
        """Gumbel noise [rows, vocab]: a hash of (seed, sample id, position, token), so resumes redraw it."""
        vocab = self.config.vocab_size
        rows = []
        for run in runs:
            pos = run.req.prefix_ids.size + len(run.tokens)
            u = unit_floats(splitmix64(run.key, np.arange(pos * vocab, (pos + 1) * vocab, dtype=np.uint64)))
            rows.append(-np.log(-np.log(u)))
        return np.stack(rows).astype(np.float32)

    def _accept(self, slot: int, token: int, logprob: float, done: list[GenOutput]) -> None:
        run = self._slots[slot]
        if run is None:
            raise EngineError(f"slot {slot} is not busy")
        run.tokens.append(token)
        run.logprobs.append(logprob)
        if self.eos_token_id is not None and token == self.eos_token_id:
            done.append(self._release(slot, "stop"))
        elif len(run.tokens) >= run.req.max_new_tokens:
            done.append(self._release(slot, "length"))

    @torch.no_grad()
    def step(self) -> list[GenOutput]:
        """Prefill queued requests into free slots, decode one token for the other busy slots."""
        done: list[GenOutput] = []
        admitted: set[int] = set()
        for slot in range(self._num_slots):
            if not self._waiting:
                break
            if self._slots[slot] is not None:
                continue
            req = self._waiting.popleft()
            if req.max_new_tokens == 0:
                self._book.done(req.request_id)
                done.append(self._output(req, [], [], "length"))
                continue
            done.extend(self._prefill(slot, req))
            admitted.add(slot)
        busy = [s for s, run in enumerate(self._slots) if run is not None and s not in admitted]
        if busy:
            runs = [r for r in (self._slots[s] for s in busy) if r is not None]
            tokens = torch.tensor([r.tokens[-1] for r in runs], device=self.device)
            positions = torch.tensor([r.length for r in runs], device=self.device)
            slots_t = torch.tensor(busy, device=self.device)
            span = max(r.length for r in runs) + 1
            logits = self.model.decode(tokens, positions, self.cache, slots_t, span)
            for run in runs:
                run.length += 1
            chosen, logprobs = self._choose(logits, runs)
            for slot, tok, lp in zip(busy, chosen, logprobs):
                self._accept(slot, tok, lp, done)
        return done

    def _prefill(self, slot: int, req: GenRequest) -> list[GenOutput]:
        ctx = torch.from_numpy(np.concatenate([req.prompt_ids, req.prefix_ids])).to(self.device)
        logits, kv = self.model.forward_with_kv(ctx[None, :])
        n = ctx.shape[0]
        for layer, (k, v) in enumerate(kv):
            self.cache.keys[layer][slot, :, :n] = k[0]
            self.cache.values[layer][slot, :, :n] = v[0]
        key = hash_key(self.seed, "gumbel", req.sample_id)
        run = _Running(req, self.clock, n, key)
        self._slots[slot] = run
        chosen, logprobs = self._choose(logits[:, -1], [run])
        done: list[GenOutput] = []
        self._accept(slot, chosen[0], logprobs[0], done)
        return done

    def abort(self, request_ids: Sequence[str]) -> list[GenOutput]:
        """Stop running or queued requests; return their partial outputs."""
        self._book.check(request_ids)
        wanted = set(request_ids)
        out = [
            self._release(slot, "abort")
            for slot, run in enumerate(self._slots)
            if run is not None and run.req.request_id in wanted
        ]
        for req in [r for r in self._waiting if r.request_id in wanted]:
            self._waiting.remove(req)
            self._book.done(req.request_id)
            out.append(self._output(req, [], [], "abort"))
        return out

    def _output(
        self, req: GenRequest, tokens: list[int], logprobs: list[float], reason: FinishReason
    ) -> GenOutput:
        return GenOutput(
            req.request_id,
            req.sample_id,
            np.asarray(tokens, dtype=np.int64),
            np.asarray(logprobs, dtype=np.float32),
            reason,
            req.weights_version,
        )

    def _release(self, slot: int, reason: FinishReason) -> GenOutput:
        run = self._slots[slot]
        if run is None:
            raise EngineError(f"slot {slot} is not busy")
        self._slots[slot] = None
        self._book.done(run.req.request_id)
        self._timeline.append(
            SlotSpan(slot, run.start, self.clock, run.req.sample_id, run.req.request_id, reason)
        )
        return self._output(run.req, run.tokens, run.logprobs, reason)
