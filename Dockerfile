# qwenvl's chat completions server on the CPU; with no model named it serves the bundled demo model,
# which needs no network. (Dockerfile.cuda is the GPU image.)
#
# Build and run, from the repository root:
#   docker build -t qwenvl .
#   docker run --rm -p 8000:8000 qwenvl
#   curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
#     -d '{"messages": [{"role": "user", "content": "Hello"}]}'
# Another model: mount its folder and name it (a hub id also works, downloaded into the container):
#   docker run --rm -p 8000:8000 -v /data/Qwen-VL-Chat:/models/chat:ro \
#     -e QWENVL_MODEL=/models/chat -e QWENVL_API_KEY=secret qwenvl
# Other commands: docker run --rm qwenvl --help
#
# Size: about 1.3 GiB. That is an estimate of the installed content, not a built image weighed:
# du of the same packages installed on Python 3.11 (torch 2.13.0+cpu 760 MiB, the other
# dependencies of qwenvl[server] 421 MiB, qwenvl with its demo model, tokenizer and font 11 MiB)
# plus about 125 MiB for python:3.11-slim itself (not measured here).

FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# The CPU build of torch, pinned as the Makefile pins it: PyPI's default build carries CUDA (GBs).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /tmp/qwenvl
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install ".[server]" && cd / && rm -rf /tmp/qwenvl

RUN useradd --create-home qwenvl
USER qwenvl
WORKDIR /home/qwenvl

# The demo model answers a question with the network switched off for the hub: it ships in the package.
RUN HF_HUB_OFFLINE=1 python -m qwenvl.demo && rm -f demo-boxes.png

EXPOSE 8000
ENTRYPOINT ["qwenvl"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
