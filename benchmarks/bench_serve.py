"""Serving load test: `clm serve` with mixed per-request alphas against the same server at one alpha and
against `transformers serve --continuous-batching` (the reference engine, no dial).

Why: benchmarks/README.md targets >= 1.0x tokens/s for mixed per-request alphas against both. Each server
runs in its own process on loopback; a load is N requests (greedy, max_tokens new tokens each, prompts
cycled) sent by C concurrent async clients over HTTP; tokens/s = completion tokens (from `usage`) / wall
time of the load; latency = per request, first byte sent to last byte received. Providers:
- clm_mixed: `clm serve`, request i at alpha MIXED[i % 7] (in [-1, 3]);
- clm_one: the same server process, every request at alpha 1;
- hf_serve: `transformers serve MODEL --continuous-batching` with the same cache sizing (its default sizing
  grew to 12.5 GB on this model), no alignment layer.
The loads run interleaved, one of each provider per round (the order reversed every other round), so
load changes on a shared machine hit all alike; the ratios per round are reported too. The clm server serves a layer W = I + noise (seeded, as if
trained), so different alphas really give different outputs (and lengths: hence tokens/s from usage);
`--layer block` serves the block layer (one decoder block more, with its own cache layer) instead.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MIXED = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about the water cycle are",
    "Here is a short recipe for a simple tomato soup:",
    "The history of the bicycle begins in",
    "A good night's sleep matters because",
    "In the year 2100, cities will",
    "The best way to learn a new language is",
    "Dear friend, I am writing to tell you",
)
# (requests, concurrent clients, max new tokens, rounds)
SETTINGS = {"smoke": (6, 3, 4, 1), "quick": (64, 16, 32, 2), "full": (128, 32, 32, 2)}
# Paged cache sizing shared by both engines: pages of 64 tokens; 128 pages hold 8192 tokens in all.
CACHE = dict(page_size=64, num_blocks=128, max_batch_tokens=256)


def parse_args():
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a checkpoint dir, .gguf or packaged model")
    p.add_argument("--providers", default="clm_mixed,clm_one,hf_serve", help="comma-separated subset")
    p.add_argument("--requests", type=int, help="requests per load")
    p.add_argument("--concurrency", type=int, help="concurrent clients")
    p.add_argument("--max-tokens", type=int, help="new tokens per request")
    p.add_argument("--rounds", type=int, help="interleaved rounds")
    p.add_argument("--layer", choices=("linear", "block"), default="linear",
                   help="the alignment layer clm serve serves (block: one decoder block more than the model)")
    p.add_argument("--mode", choices=("embed", "logits"), default="embed",
                   help="clm serve's merge (logits: two streams per request in every forward)")
    return p.parse_args()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def perturbed_layer(model_dir: str, out: Path, layer: str = "linear") -> str:
    """A saved layer off the identity, seeded, as if trained: a trained layer's cost and alpha-dependent outputs.
    Linear: W = I + N(0, (0.3/sqrt(d))^2), b = 0. Block: the zeroed output projections (o_proj, down_proj)
    get N(0, (0.3/sqrt(fan_in))^2) weights."""
    from transformers import AutoModelForCausalLM

    import clm_ext
    from clm_ext.model import alignment_site

    model = clm_ext.add_alignment_control(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                          layer=layer)
    site = alignment_site(model)
    g = torch.Generator().manual_seed(0)
    linears = [site.alignment] if layer == "linear" else [site.block.self_attn.o_proj, site.block.mlp.down_proj]
    with torch.no_grad():
        for linear in linears:
            linear.weight.add_(0.3 / linear.weight.shape[1]**0.5 * torch.randn(linear.weight.shape, generator=g))
    clm_ext.save_alignment(model, out)
    return str(out)


class Server:
    """A server subprocess; `wait_ready` polls a URL until it answers."""

    def __init__(self, cmd: list, port: int, log: Path, env=None):
        self.port, self.log_path = port, log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, path: str, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log_path}:\n"
                                 + self.log_path.read_text()[-2000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"server on port {self.port} not ready after {timeout} s; see {self.log_path}")

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def run_load(url: str, model: str, n: int, concurrency: int, max_tokens: int, alpha_of) -> dict:
    """n requests from `concurrency` clients; returns tokens, wall seconds, latencies, failures."""
    import httpx

    queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    latencies, tokens, failures = [], 0, 0

    async def client(http):
        nonlocal tokens, failures
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
            alpha = alpha_of(i)
            if alpha is not None:
                body["alpha"] = alpha
            t0 = time.perf_counter()
            try:
                r = await http.post(url, json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
            except (httpx.HTTPError, KeyError, ValueError):
                failures += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return dict(tokens=tokens, wall=wall, latencies=latencies, failures=failures)


def percentile(values, p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))] if v else float("nan")


def main() -> None:
    args = parse_args()
    device, dtype = common.resolve(args)
    if dtype != torch.float32:
        raise SystemExit("bench_serve: fp32 only (both servers load the checkpoint's float32 weights)")
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    n, conc, max_tokens, rounds = SETTINGS[preset]
    n, conc = args.requests or n, args.concurrency or conc
    max_tokens, rounds = args.max_tokens or max_tokens, args.rounds or rounds
    providers = args.providers.split(",")
    unknown = set(providers) - {"clm_mixed", "clm_one", "hf_serve"}
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}")

    from clm_ext.sources import resolve_model

    model_dir = resolve_model(args.model)
    threads = ["--threads", str(args.threads)] if args.threads else []
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    servers, urls = {}, {}
    try:
        if {"clm_mixed", "clm_one"} & set(providers):
            port = free_port()
            layer = perturbed_layer(model_dir, work / "layer", args.layer)
            cmd = [sys.executable, "-m", "clm_ext.cli", "serve", "--model", model_dir, "--alignment", layer,
                   "--served-model-name", "m", "--port", str(port), "--device", device.type,
                   "--max-queue", str(max(conc, 1) * 2), "--page-size", str(CACHE["page_size"]),
                   "--cache-blocks", str(CACHE["num_blocks"]), "--max-batch-tokens", str(CACHE["max_batch_tokens"]),
                   "--mode", args.mode, *threads]
            servers["clm"] = Server(cmd, port, work / "clm.log")
            servers["clm"].wait_ready("/health")
            urls["clm"] = (f"http://127.0.0.1:{port}/v1/completions", "m")
        if "hf_serve" in providers:
            port = free_port()
            cli = Path(sys.executable).parent / "transformers"
            cmd = [str(cli), "serve", model_dir, "--continuous-batching", "--device", device.type, "--dtype", "float32",
                   "--cb-block-size", str(CACHE["page_size"]), "--cb-num-blocks", str(CACHE["num_blocks"]),
                   "--cb-max-batch-tokens", str(CACHE["max_batch_tokens"]), "--host", "127.0.0.1", "--port", str(port)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
            servers["hf"] = Server(cmd, port, work / "hf.log", env=env)
            servers["hf"].wait_ready("/v1/models")
            urls["hf"] = (f"http://127.0.0.1:{port}/v1/completions", model_dir)
        plan = {"clm_mixed": ("clm", lambda i: MIXED[i % len(MIXED)]), "clm_one": ("clm", lambda i: 1.0),
                "hf_serve": ("hf", lambda i: None)}
        for name in providers:  # warm-up: each engine pays its first-request set-up before timing
            server, alpha_of = plan[name]
            asyncio.run(run_load(*urls[server], min(conc, 4), min(conc, 4), 4, alpha_of))
        results = {name: [] for name in providers}
        for r in range(rounds):
            for name in providers if r % 2 == 0 else providers[::-1]:  # alternate who goes first
                server, alpha_of = plan[name]
                res = asyncio.run(run_load(*urls[server], n, conc, max_tokens, alpha_of))
                results[name].append(res)
                print(f"round {r} {name}: {res['tokens'] / res['wall']:.1f} tok/s, {res['tokens']} tokens in "
                      f"{res['wall']:.1f} s, p50 {percentile(res['latencies'], 0.5):.2f} s, "
                      f"{res['failures']} failures", flush=True)
        suffix = ("" if args.layer == "linear" else "_block") + ("" if args.mode == "embed" else "_logits")
        rows = common.Rows("serve" + suffix, device, dtype)
        shape = f"{n} requests, {conc} clients, {max_tokens} new tokens"
        case = Path(args.model).name + ("" if args.layer == "linear" else ", block layer") + (
            "" if args.mode == "embed" else ", mode logits")
        for name, runs in results.items():
            rows.add(case, shape, name, "tokens_per_s", "tok/s", [x["tokens"] / x["wall"] for x in runs])
            rows.add(case, shape, name, "latency_p50_s", "s", [percentile(x["latencies"], 0.5) for x in runs])
            rows.add(case, shape, name, "latency_p95_s", "s", [percentile(x["latencies"], 0.95) for x in runs])
            rows.add(case, shape, name, "latency_p99_s", "s", [percentile(x["latencies"], 0.99) for x in runs])
            rows.add(case, shape, name, "failures", "count", sum(x["failures"] for x in runs))
            server = servers["clm" if name.startswith("clm") else "hf"]
            rows.add(case, shape, name, "server_peak_rss_bytes", "bytes", server.peak_rss_bytes())
        for ref in ("clm_one", "hf_serve"):
            if "clm_mixed" in results and ref in results:
                ratios = [m["tokens"] / m["wall"] / (o["tokens"] / o["wall"])
                          for m, o in zip(results["clm_mixed"], results[ref])]
                rows.add(case, shape, f"clm_mixed/{ref}", "tokens_per_s_ratio", "x", ratios)
        path = rows.write(args.out)
        print(f"wrote {path}.json and .csv")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
