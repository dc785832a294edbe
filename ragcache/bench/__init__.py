"""Benchmarks: each prints a table, writes JSON and compares against a baseline run in
the same process. Run one as ``ragcache bench NAME [options]`` or
``python -m ragcache.bench.NAME [options]``; no library package imports this one."""

# name -> what it measures; the module is ragcache.bench.<name>, with main(argv).
BENCHMARKS: dict[str, str] = {
    "model": "forward-pass throughput (prefill, decode) against transformers",
    "engine": "continuous batching against transformers one request at a time",
    "linear": "projection products: MKL, oneDNN, weight-major, exact block copies",
    "lora": "many LoRA adapters in mixed batches against one batch per adapter",
    "speculate": "decode speed with and without speculative drafts",
    "kernels": "each Triton kernel against its torch reference (CUDA)",
    "policy": "replacement policies on Zipf traces: hit rate and saved prefill",
    "tiers": "chunk reads from the host and the LMDB tier against a numpy copy",
    "fusion_memory": "peak memory of a fused query against a full prefill's, per method",
    "codec": "answer agreement of int8 chunk KV with raw chunk KV on MuSiQue",
    "codec_cachegen": "KV codecs: bytes per token, error, speed, answer agreement",
    "cluster": "TTFT with chunk KV from the host tier, the Redis tier, or recomputed",
    "recall": "retrieval recall@k on MuSiQue",
    "serve": "the HTTP server under Poisson load, chunk caching on and off",
    "workload": "the knowledge tree and Cache-Craft under a MuSiQue request stream",
    "noisy_neighbour": "a tenant's queries alone and beside another's ingest and bad requests",
    "scheduling": "overlapped KV and cache-aware order on a burst of warm and cold queries",
}
