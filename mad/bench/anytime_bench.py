"""Anytime serving, measured end to end on a real `mad serve` subprocess: what a latency budget
buys (the latency/quality curve), degradation under overload against plain shedding,
progressive results (time to the draft vs to the final answer) and the feature cache.

Requests ask for the tasks the model refines by default and carry images of the synthetic
validation distribution (`mad data synth --world v1`, seed 1, as `data/synth-val`), so
detection counts, and with them the prompted tasks' work, vary as in use. Quality is the
model's own metrics (`mad eval`'s evaluate, in process) at the refinement steps the server
actually applied to the answers: the mix of steps they got, weighted by how many got each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from mad.bench.serve_process import Server
from mad.bench.stats import median, ratio, summarize
from mad.bench.workload import jpeg_bytes

SLO_S = 1.0  # goodput counts requests answered within this
OVERLOAD_BLOCKS = 3  # the overload runs alternate in this many blocks
Steps = tuple[tuple[str, int], ...]  # refine_steps_applied, hashable


def steps_key(applied: dict[str, int]) -> Steps:
    return tuple(sorted(applied.items()))


class Quality:
    """The model's metrics at given refinement steps on the validation images, memoised."""

    def __init__(self, checkpoint: Path, data: Path, device: str, limit: int) -> None:
        from model.checkpoint import load_checkpoint

        self.mad, _ = load_checkpoint(checkpoint, "cpu")
        self.data, self.device, self.limit = data, device, limit
        self.cache: dict[Steps, dict[str, float]] = {}
        self.tasks: tuple[str, ...] | None = None  # None: all the model's

    def __call__(self, steps: Steps) -> dict[str, float]:
        from model.evaluate import evaluate

        if steps not in self.cache:
            self.cache[steps] = evaluate(
                self.mad,
                self.data,
                device=self.device,
                refine_steps=dict(steps),
                limit=self.limit,
                tasks=self.tasks,
            )
        return self.cache[steps]

    def mix(self, counts: Counter[Steps]) -> dict[str, float]:
        """Metrics of a mix of step choices, weighted by how many requests got each."""
        total = sum(counts.values())
        if not total:
            return {}
        out: dict[str, float] = {}
        for steps, n in counts.items():
            for name, value in self(steps).items():
                out[name] = out.get(name, 0.0) + value * n / total
        return out


async def send(
    client: httpx.AsyncClient, url: str, payload: bytes, fields: dict[str, str]
) -> tuple[int, float, dict[str, Any]]:
    """One POST /predict -> (status, seconds, JSON body)."""
    start = time.perf_counter()
    response = await client.post(
        f"{url}/predict", data=fields, files={"image": ("bench.jpg", payload, "image/jpeg")}
    )
    body = response.json()
    return response.status_code, time.perf_counter() - start, body


async def sequential(
    url: str, payloads: list[bytes], fields: dict[str, str], count: int
) -> list[tuple[int, float, dict[str, Any]]]:
    """`count` requests one after another (concurrency 1), cycling through the images."""
    async with httpx.AsyncClient(timeout=120) as client:
        return [await send(client, url, payloads[i % len(payloads)], fields) for i in range(count)]


def latency_of(outcomes: list[tuple[int, float, dict[str, Any]]]) -> dict[str, float]:
    return summarize([seconds for status, seconds, _ in outcomes if status == 200])


def server_ms(outcomes: list[tuple[int, float, dict[str, Any]]]) -> list[float]:
    """The answers' latency by the server's clock (timings_ms.total): what a budget counts."""
    return [body["timings_ms"]["total"] for status, _, body in outcomes if status == 200]


REFUSED_BUDGET_MS = 1.0


def budget_ladder(one_pass_ms: float, full_ms: float) -> list[float]:
    """Budgets from below any draft (1 ms: receiving and decoding an upload alone takes
    longer, so it is refused whatever the load; a relative rung is not, since a busy host's
    answers are slower than the fastest stages the refusal compares with) to above the full
    answer, by the server's clock."""
    span = max(full_ms - one_pass_ms, 1.0)
    ladder = [REFUSED_BUDGET_MS, 1.1 * one_pass_ms]
    ladder += [one_pass_ms + f * span for f in (0.35, 0.6, 0.85)]
    ladder += [1.15 * full_ms, 2.0 * full_ms]
    return sorted(round(b, 1) for b in ladder)


def budgets(
    url: str, payloads: list[bytes], tasks: str, count: int, quality: Quality
) -> dict[str, Any]:
    """The latency/quality curve: per budget, what was applied, latencies, the metrics.
    The ladder comes from a first short round of default and one-pass requests (their
    latencies by the server's clock, which is what a budget counts); then every
    image is sent at every level in turn, so load that varies over time (a shared machine)
    weighs on every level alike."""
    fields = {"tasks": tasks}
    one_pass_fields = {**fields, "refine_steps": "0"}
    probe = max(3, count // 4)
    full = asyncio.run(sequential(url, payloads, fields, probe))
    one_pass = asyncio.run(sequential(url, payloads, one_pass_fields, probe))
    ladder = budget_ladder(
        statistics.median(server_ms(one_pass)), statistics.median(server_ms(full))
    )
    variants: dict[str, dict[str, str]] = {"full": fields, "one_pass": one_pass_fields}
    variants |= {str(b): {**fields, "latency_budget_ms": str(b)} for b in ladder}

    async def run() -> dict[str, list[tuple[int, float, dict[str, Any]]]]:
        out: dict[str, list[tuple[int, float, dict[str, Any]]]] = {k: [] for k in variants}
        async with httpx.AsyncClient(timeout=120) as client:
            for i in range(count):
                for name, form in variants.items():
                    out[name].append(await send(client, url, payloads[i % len(payloads)], form))
        return out

    outcomes = asyncio.run(run())

    def reference(name: str) -> dict[str, Any]:
        ok = [body for status, _, body in outcomes[name] if status == 200]
        applied = Counter(steps_key(body["refine_steps_applied"]) for body in ok)
        return {
            "latency": latency_of(outcomes[name]),
            "server_latency": summarize([ms / 1000 for ms in server_ms(outcomes[name])]),
            "metrics": quality.mix(applied),
        }

    levels = []
    for budget in ladder:
        runs = outcomes[str(budget)]
        ok = [body for status, _, body in runs if status == 200]
        applied = Counter(steps_key(body["refine_steps_applied"]) for body in ok)
        seconds = [s for status, s, _ in runs if status == 200]
        mode = applied.most_common(1)[0] if applied else None
        levels.append(
            {
                "budget_ms": budget,
                "requests": len(runs),
                "refused": sum(status == 422 for status, _, _ in runs),
                "cut": sum(body["budget"]["cut"] for body in ok),
                "within_budget": sum(s * 1000 <= budget for s in seconds),
                # By the server's own clock (arrival to answer built, its timings_ms.total):
                # what the budget counts; the client also pays the network and HTTP around it.
                "within_budget_server": sum(b["timings_ms"]["total"] <= budget for b in ok),
                "latency": summarize(seconds),
                "server_latency": summarize([b["timings_ms"]["total"] / 1000 for b in ok]),
                "planned": summarize([body["budget"]["estimated_ms"] / 1000 for body in ok]),
                "applied": {json.dumps(dict(k)): n for k, n in applied.items()},
                "typical_steps": dict(mode[0]) if mode else None,
                "typical_share": mode[1] / len(ok) if mode else None,
                "metrics": quality(mode[0]) if mode else {},
                "metrics_of_the_mix": quality.mix(applied),
            }
        )
    return {
        "tasks": tasks,
        "requests_per_level": count,
        "full": reference("full"),
        "one_pass": reference("one_pass"),
        "levels": levels,
    }


async def stream_once(
    client: httpx.AsyncClient, url: str, payload: bytes, fields: dict[str, str]
) -> tuple[float, float, int]:
    """One NDJSON request -> (seconds to the first object, to the last, objects)."""
    start, first, objects = time.perf_counter(), None, 0
    async with client.stream(
        "POST",
        f"{url}/predict",
        data=fields,
        files={"image": ("bench.jpg", payload, "image/jpeg")},
        headers={"Accept": "application/x-ndjson"},
    ) as response:
        async for line in response.aiter_lines():
            if line.strip():
                objects += 1
                first = first or time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, objects


def progressive(url: str, payloads: list[bytes], tasks: str, count: int) -> dict[str, Any]:
    async def run() -> list[tuple[float, float, int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            fields = {"tasks": tasks}
            return [
                await stream_once(client, url, payloads[i % len(payloads)], fields)
                for i in range(count)
            ]

    runs = asyncio.run(run())
    first, final = summarize([r[0] for r in runs]), summarize([r[1] for r in runs])
    return {
        "requests": count,
        "objects_per_request": statistics.median(r[2] for r in runs),
        "first_result": first,
        "final_result": final,
        "first_over_final": ratio(median(first), median(final)),
    }


async def open_loop(
    url: str, payloads: list[bytes], fields: dict[str, str], rate: float, count: int, seed: int
) -> list[tuple[int, float, dict[str, Any]]]:
    """`count` requests at Poisson arrivals of `rate` per second, whatever the answers."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def arrive(i: int, at: float) -> tuple[int, float, dict[str, Any]]:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            return await send(client, url, payloads[i % len(payloads)], fields)

        start, at, tasks = time.perf_counter(), 0.0, []
        for i in range(count):
            at += rng.expovariate(rate)
            tasks.append(asyncio.create_task(arrive(i, start + at)))
        return list(await asyncio.gather(*tasks))


def overload_run(
    outcomes: list[tuple[int, float, dict[str, Any]]], seconds: float, quality: Quality
) -> dict[str, Any]:
    ok = [(s, body) for status, s, body in outcomes if status == 200]
    applied = Counter(steps_key(body["refine_steps_applied"]) for _, body in ok)
    good = sum(s <= SLO_S for s, _ in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "shed_503": sum(status == 503 for status, _, _ in outcomes),
        "other_errors": sum(status not in (200, 503) for status, _, _ in outcomes),
        "share_503": sum(status == 503 for status, _, _ in outcomes) / len(outcomes),
        "goodput": good / len(outcomes),
        "goodput_rps": good / seconds,
        "answers_per_s": len(ok) / seconds,
        "degraded": sum(bool(body.get("degraded")) for _, body in ok),
        "latency": summarize([s for s, _ in ok]),
        "applied": {json.dumps(dict(k)): n for k, n in applied.items()},
        "metrics": quality.mix(applied),
    }


def feature_cache(url: str, payloads: list[bytes], count: int) -> dict[str, Any]:
    """Caption latency of an image the server encoded a moment ago (for detection) vs of one
    it has not seen; both after a detection request, so the two differ only in the cache."""

    async def run() -> tuple[list[float], list[float], list[float]]:
        hit, miss, encode = [], [], []
        async with httpx.AsyncClient(timeout=120) as client:
            for i in range(count):
                # Padding makes bytes no earlier request had (a JPEG decoder ignores it).
                pad = b"\0" * (i + 1)
                seen = payloads[(2 * i) % len(payloads)] + pad
                unseen = payloads[(2 * i + 1) % len(payloads)] + pad
                await send(client, url, seen, {"tasks": "detection"})
                _, seconds, body = await send(client, url, seen, {"tasks": "caption"})
                hit.append(seconds)
                encode.append(body["timings_ms"]["encode"] / 1000)
                _, seconds, _ = await send(client, url, unseen, {"tasks": "caption"})
                miss.append(seconds)
        return hit, miss, encode

    hit, miss, encode = asyncio.run(run())
    return {
        "requests": count,
        "caption_after_detection_same_image": summarize(hit),
        "caption_new_image": summarize(miss),
        "encode_on_hit": summarize(encode),
        "miss_over_hit": ratio(median(summarize(miss)), median(summarize(hit))),
    }


def anytime_benchmark(
    checkpoint: Path,
    backend: str,
    device: str,
    eval_images: int,
    requests: int,
    overload_requests: int,
    export_dir: Path | None = None,
    echo: Callable[[str], object] = print,
) -> dict[str, Any]:
    from model.data.synth import write_synthetic_dataset
    from model.evaluate import GroundTruth

    with tempfile.TemporaryDirectory(prefix="mad-bench-anytime-") as tmp:
        data = Path(tmp) / "val"
        # World v1, the bundled model's (as mad.bench.workload's images are).
        write_synthetic_dataset(data, train=0, val=eval_images, seed=1, world="v1")
        truth = GroundTruth.load(data, "val2017")
        payloads = [jpeg_bytes(truth.image(i).convert("RGB")) for i in truth.image_ids]
        quality = Quality(checkpoint, data, device, eval_images)
        # The tasks the model refines (its default schedules have steps): what a budget or
        # degradation can trade; with none, every task.
        config = quality.mad.config
        refined = tuple(t for t in config.tasks if config.schedules.get(t))
        quality.tasks = refined or tuple(config.tasks)
        tasks = ",".join(quality.tasks)
        out: dict[str, Any] = {"eval_images": eval_images, "slo_s": SLO_S, "tasks": tasks}

        env = {"MAD_MAX_BATCH_SIZE": "1"}
        echo("  starting mad serve (budgets, progressive results)")
        with Server(checkpoint, backend, device, env, export_dir) as server:
            asyncio.run(sequential(server.url, payloads, {"tasks": tasks}, 3))  # warm
            out["budgets"] = budgets(server.url, payloads, tasks, requests, quality)
            echo(f"    budgets: {[lv['budget_ms'] for lv in out['budgets']['levels']]} ms")
            out["progressive"] = progressive(server.url, payloads, tasks, requests)
        full_ms = median(out["budgets"]["full"]["latency"]) or 100.0
        rate = 2000.0 / full_ms  # twice what the server sustains at full quality
        # A queue holding about one SLO of full-quality work (at least 8).
        queue_size = max(8, round(SLO_S * 1000 / full_ms))
        out["overload"] = {
            "rate_rps": rate,
            "queue_size": queue_size,
            "blocks": OVERLOAD_BLOCKS,
            "runs": {},
        }
        echo(f"  starting two mad serve (queue {queue_size}, {rate:.1f} req/s offered)")
        with contextlib.ExitStack() as stack:
            servers = {}
            for name, degrade in (("degradation_off", "false"), ("degradation_on", "true")):
                env = {
                    "MAD_MAX_BATCH_SIZE": "1",
                    "MAD_QUEUE_SIZE": str(queue_size),
                    "MAD_DEGRADE": degrade,
                }
                servers[name] = stack.enter_context(
                    Server(checkpoint, backend, device, env, export_dir)
                )
                asyncio.run(sequential(servers[name].url, payloads, {"tasks": tasks}, 3))
            # Blocks of each in turn (the idle server costs nothing), so load that varies over
            # time on a shared machine weighs on both alike.
            outcomes: dict[str, list[tuple[int, float, dict[str, Any]]]] = {n: [] for n in servers}
            seconds = dict.fromkeys(servers, 0.0)
            block = max(1, overload_requests // OVERLOAD_BLOCKS)
            for b in range(OVERLOAD_BLOCKS):
                for name, server in servers.items():
                    start = time.perf_counter()
                    outcomes[name] += asyncio.run(
                        open_loop(server.url, payloads, {"tasks": tasks}, rate, block, b)
                    )
                    seconds[name] += time.perf_counter() - start
            for name in servers:
                out["overload"]["runs"][name] = overload_run(outcomes[name], seconds[name], quality)
        env = {"MAD_MAX_BATCH_SIZE": "1", "MAD_FEATURE_CACHE_MB": "64"}
        echo("  starting mad serve (feature cache)")
        with Server(checkpoint, backend, device, env, export_dir) as server:
            asyncio.run(sequential(server.url, payloads, {"tasks": tasks}, 3))
            out["feature_cache"] = feature_cache(server.url, payloads, min(requests, 20))
    return out
