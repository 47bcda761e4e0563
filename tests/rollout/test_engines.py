"""SimulatedEngine and TorchEngine: determinism, cost model, abort/resume, KV-cache correctness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pr_loader.errors import ConfigError, EngineError
from pr_loader.rollout import Engine, GenOutput, GenRequest, LengthDistribution, SimulatedEngine, TorchEngine
from pr_loader.rollout.simulated import hashed_tokens
from pr_loader.rollout.torch_engine import KVCache, TinyConfig, TinyTransformer


def run_all(engine: Engine) -> list[tuple[GenOutput, float]]:
    out = []
    while engine.num_pending():
        out += [(o, engine.clock) for o in engine.step()]
    return out


def reqs(n: int, max_new: int = 10_000, prompt: int = 8) -> list[GenRequest]:
    return [GenRequest(f"r{i}", f"0:{i}", np.arange(1, prompt + 1), max_new) for i in range(n)]


# ----------------------------------------------------------------------------- lengths
def test_length_distribution_quantiles_cap_and_determinism() -> None:
    dist = LengthDistribution.lognormal(500, 5000, max_tokens=16000, seed=1)
    lens = np.array([dist.length_of(f"0:{i}") for i in range(20000)])
    assert abs(np.median(lens) / 500 - 1) < 0.05
    assert abs(np.percentile(lens, 99) / 5000 - 1) < 0.15
    assert lens.min() >= 1 and lens.max() <= 16000
    again = LengthDistribution.lognormal(500, 5000, max_tokens=16000, seed=1)
    assert [again(f"0:{i}") for i in range(100)] == lens[:100].tolist()
    other = LengthDistribution.lognormal(500, 5000, max_tokens=16000, seed=2)
    assert [other(f"0:{i}") for i in range(100)] != lens[:100].tolist()
    capped = LengthDistribution.lognormal(500, 5000, max_tokens=600, seed=1)
    assert max(capped(f"0:{i}") for i in range(2000)) == 600


def test_length_mixture() -> None:
    mix = LengthDistribution([(0.9, 50, 60), (0.1, 5000, 6000)], max_tokens=10_000, seed=0)
    lens = np.array([mix(f"1:{i}") for i in range(5000)])
    long = (lens > 1000).mean()
    assert 0.07 < long < 0.13 and np.median(lens) < 60
    with pytest.raises(ConfigError):
        LengthDistribution([], max_tokens=10)
    with pytest.raises(ConfigError):
        LengthDistribution([(1.0, 100, 50)], max_tokens=10)


# ----------------------------------------------------------------------------- simulated
def test_simulated_is_deterministic() -> None:
    def trace() -> list[tuple[str, list[int], float]]:
        eng = SimulatedEngine(
            LengthDistribution.lognormal(50, 500, max_tokens=800, seed=4), num_slots=8, seed=9
        )
        eng.submit(reqs(30))
        return [(o.sample_id, o.token_ids.tolist(), t) for o, t in run_all(eng)]

    assert trace() == trace()


def test_simulated_cost_model() -> None:
    dist = LengthDistribution.lognormal(100, 100.0001, max_tokens=1000, seed=0)
    eng = SimulatedEngine(
        dist, num_slots=1, decode_base_s=0.02, decode_per_seq_s=0.01, prefill_per_token_s=0.001
    )
    eng.submit(reqs(2, prompt=10))
    (a, ta), (b, tb) = run_all(eng)
    la, lb = dist("0:0"), dist("0:1")
    assert a.token_ids.size == la and b.token_ids.size == lb
    assert math.isclose(ta, 10 * 0.001 + la * 0.03)  # prefill, then la iterations of one sequence
    assert math.isclose(tb, ta + 10 * 0.001 + lb * 0.03)  # queued behind the first (one slot)
    assert a.finish_reason == "stop" and a.finished
    spans = eng.timeline
    assert [s.slot for s in spans] == [0, 0] and math.isclose(spans[1].start, ta)


def test_simulated_continuous_batching_shares_iterations() -> None:
    dist = LengthDistribution.lognormal(100, 2000, max_tokens=3000, seed=0)
    eng = SimulatedEngine(
        dist, num_slots=4, decode_base_s=0.02, decode_per_seq_s=0.0, prefill_per_token_s=0.0
    )
    eng.submit(reqs(4))
    outs = run_all(eng)
    longest = max(dist(f"0:{i}") for i in range(4))
    assert math.isclose(outs[-1][1], longest * 0.02)  # all four decode together
    assert eng.decode_iterations == longest


def test_simulated_abort_and_resume_equals_uninterrupted() -> None:
    dist = LengthDistribution.lognormal(200, 2000, max_tokens=3000, seed=2)
    eng = SimulatedEngine(dist, num_slots=2, seed=3)
    eng.submit(reqs(3))  # the third one waits for a slot
    first = eng.step()
    aborted = eng.abort([r.request_id for r in reqs(3) if r.request_id not in {o.request_id for o in first}])
    assert all(not o.finished for o in aborted) and eng.num_pending() == 0
    queued = next(o for o in aborted if o.request_id == "r2")
    assert queued.token_ids.size == 0
    for part in aborted:
        prefix = part.token_ids
        eng.submit(
            [GenRequest("x" + part.request_id, part.sample_id, np.arange(1, 9), 10_000, prefix_ids=prefix)]
        )
        ((rest, _),) = run_all(eng)
        full = np.concatenate([prefix, rest.token_ids])
        want = hashed_tokens(3, part.sample_id, 0, dist(part.sample_id), 32000)
        np.testing.assert_array_equal(full, want[0])
        np.testing.assert_array_equal(np.concatenate([part.logprobs, rest.logprobs]), want[1])


def test_simulated_budget_and_errors() -> None:
    dist = LengthDistribution.lognormal(500, 600, max_tokens=1000, seed=0)
    eng = SimulatedEngine(dist, num_slots=2)
    eng.submit(reqs(1, max_new=7))
    ((out, _),) = run_all(eng)
    assert out.token_ids.size == 7 and out.finish_reason == "length"
    eng.submit(reqs(1))
    with pytest.raises(EngineError, match="already in flight"):
        eng.submit(reqs(1))
    with pytest.raises(EngineError, match="not in flight"):
        eng.abort(["nope"])
    with pytest.raises(EngineError):
        GenRequest("a", "0:0", np.zeros((2, 2)), 3)
    with pytest.raises(EngineError):
        GenRequest("a", "0:0", np.arange(3), -1)
    with pytest.raises(ConfigError):
        SimulatedEngine(dist, num_slots=0)


def test_simulated_thousands_of_steps_are_fast() -> None:
    import time

    dist = LengthDistribution.lognormal(500, 5000, max_tokens=16000, seed=0)
    eng = SimulatedEngine(dist, num_slots=256)
    eng.submit(reqs(2000, prompt=64))
    t0 = time.perf_counter()
    outs = run_all(eng)
    assert len(outs) == 2000 and time.perf_counter() - t0 < 5.0
    assert eng.decode_iterations > 10_000  # ~ many thousands of decode iterations, jumped over


# ----------------------------------------------------------------------------- torch
CFG = TinyConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, max_seq_len=96)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_incremental_logits_equal_full_forward(device: str) -> None:
    model = TinyTransformer(CFG, seed=0).to(device=device, dtype=torch.float64).eval()
    cache = KVCache.empty(CFG, 3, torch.device(device), torch.float64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 128, (n,), generator=g).to(device) for n in (5, 9, 2)]
    with torch.no_grad():
        for slot, seq in enumerate(seqs):
            _, kv = model.forward_with_kv(seq[None])
            for layer, (k, v) in enumerate(kv):
                cache.keys[layer][slot, :, : seq.numel()] = k[0]
                cache.values[layer][slot, :, : seq.numel()] = v[0]
        for _ in range(6):  # batched decode of three slots at different positions
            nxt = torch.randint(0, 128, (3,), generator=g).to(device)
            pos = torch.tensor([s.numel() for s in seqs], device=device)
            logits = model.decode(nxt, pos, cache, torch.arange(3, device=device), int(pos.max()) + 1)
            seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, nxt)]
            for i, s in enumerate(seqs):
                torch.testing.assert_close(logits[i], model(s[None])[0, -1], rtol=1e-9, atol=1e-9)


def torch_engine(device: str = "cpu", **kw: object) -> TorchEngine:
    return TorchEngine(CFG, num_slots=3, device=device, dtype=torch.float64, seed=1, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_torch_engine_deterministic_and_resume_equals_uninterrupted(temperature: float, device: str) -> None:
    def full() -> dict[str, GenOutput]:
        eng = torch_engine(device, temperature=temperature)
        eng.submit(reqs(5, max_new=30, prompt=6))
        return {o.sample_id: o for o, _ in run_all(eng)}

    ref = full()
    assert {k: v.token_ids.tolist() for k, v in ref.items()} == {
        k: v.token_ids.tolist() for k, v in full().items()
    }
    eng = torch_engine(device, temperature=temperature)
    eng.submit(reqs(5, max_new=30, prompt=6))
    for _ in range(12):
        eng.step()
    parts = eng.abort([f"r{i}" for i in range(5)])
    assert any(p.token_ids.size for p in parts) and all(p.finish_reason == "abort" for p in parts)
    for p in parts:
        left = 30 - p.token_ids.size
        eng.submit(
            [GenRequest("y" + p.request_id, p.sample_id, np.arange(1, 7), left, prefix_ids=p.token_ids)]
        )
    rest = {o.sample_id: o for o, _ in run_all(eng)}
    for p in parts:
        got = np.concatenate([p.token_ids, rest[p.sample_id].token_ids])
        np.testing.assert_array_equal(got, ref[p.sample_id].token_ids)
        lps = np.concatenate([p.logprobs, rest[p.sample_id].logprobs])
        np.testing.assert_allclose(lps, ref[p.sample_id].logprobs, atol=1e-6)
    assert len(eng.timeline) == 3 + 5 and eng.clock > 0  # 3 aborted in slots (2 were queued), 5 resumed


def test_torch_engine_eos_budget_and_errors() -> None:
    probe = torch_engine()
    probe.submit(reqs(1, max_new=5))
    ((first, _),) = run_all(probe)
    eos = int(first.token_ids[2])
    eng = torch_engine(eos_token_id=eos)
    eng.submit(reqs(1, max_new=5))
    ((out, _),) = run_all(eng)
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and out.token_ids.size <= 3
    eng.submit([GenRequest("z", "0:9", np.arange(1, 4), 0)])
    ((out, _),) = run_all(eng)
    assert out.token_ids.size == 0 and out.finish_reason == "length"
    with pytest.raises(EngineError, match="max_seq_len"):
        eng.submit(reqs(1, max_new=95))
    with pytest.raises(EngineError, match="outside"):
        eng.submit([GenRequest("w", "0:1", np.array([500]), 3)])
    with pytest.raises(EngineError, match="empty prompt"):
        eng.submit([GenRequest("w", "0:1", np.zeros(0, dtype=np.int64), 3)])
    with pytest.raises(ConfigError):
        TinyConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError):
        torch_engine(eos_token_id=1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_engine_cuda_generates_what_cpu_generates() -> None:
    outs = {}
    for device in ("cpu", "cuda"):
        eng = torch_engine(device)
        eng.submit(reqs(6, max_new=40, prompt=5))
        outs[device] = {o.sample_id: o.token_ids.tolist() for o, _ in run_all(eng)}
    assert outs["cpu"] == outs["cuda"]
