# SDXL + LCM-LoRA on Triton. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The servable repository the export assembles from the tracked templates (model_repository/) and
# make serve serves; build outputs live under build/ only, so a clone stays as git has it.
REPOSITORY ?= build/model_repository
# Where benchmarks write their results (committed figures: benchmarks/results/; docs/benchmarks.md).
BENCH_RESULTS ?= build/results
export BENCH_RESULTS
TINY_DIR ?= build/tiny
# The CPU variant's dtype: ONNX Runtime's CPU kernels are faster and leaner in fp32 (measured:
# benchmarks/results/scale_cpu.md). Production (make production) exports fp16 for TensorRT.
DTYPE ?= fp32
# Everything pytest is given; e.g. `make test PYTEST_ARGS="-k lora -x"`.
PYTEST_ARGS ?=

# make serve: the address every port listens on (loopback: this machine only; HOST=0.0.0.0 exposes
# them, docs/security.md), ports (Triton's defaults) and variant (auto: production with a GPU and
# TensorRT plans, else cpu)
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# The supervisor's health (/v2/health/ready, /v2/health/live) and metrics port: what probes call.
HEALTH_PORT ?= 8003
# On SIGTERM: how long admitted requests may take to finish, then tritonserver's own shutdown.
# Kubernetes: terminationGracePeriodSeconds >= DRAIN_TIMEOUT_S + EXIT_TIMEOUT_S + 5.
DRAIN_TIMEOUT_S ?= 60
EXIT_TIMEOUT_S ?= 15
# MiB of the prompt cache (docs/serving.md, "The prompt cache"); 0: none.
PROMPT_CACHE_MB ?= 64
TRACE_FILE ?=
TRACE_RATE ?= 1000
VARIANT ?= auto
# The key of Triton's admin APIs (statistics, model configs, repository, shared memory, trace, logging):
# $SDXL_ADMIN_KEY, else ADMIN_KEY_FILE; with neither, make serve generates one per start into
# build/admin-key (mode 600), where make perf and python -m client --info find it.
ADMIN_KEY_FILE ?=

# The Triton release and the TensorRT it ships are named once, in deploy/Dockerfile (build args).
# make install-gpu: the TensorRT Python package must be the TensorRT of the Triton container that
# serves the plans (a plan only loads in the TensorRT version that built it).
dockerfile_arg = $(shell sed -n 's/^ARG $(1)=//p' deploy/Dockerfile)
TRITON_RELEASE ?= $(call dockerfile_arg,TRITON_RELEASE)
TRT_VERSION ?= $(call dockerfile_arg,TENSORRT_VERSION)
TRT_WHEEL ?= $(call dockerfile_arg,TENSORRT_WHEEL)

# The deployment tools (Helm SDK, kubernetes-validate, checkov, hadolint) live in their own venv:
# checkov's pins are older than the serving stack's (requirements/deploy.in).
DEPLOY_VENV ?= .venv-deploy
DEPLOY_PY := $(DEPLOY_VENV)/bin/python
# make k8s-render: the chart rendered with these values files (default: the chart's own values).
VALUES ?=
K8S_NAMESPACE ?= sdxl

# make bench-gpu: python -m benchmarks.gpu (GPU_BENCH_ARGS, e.g. "--batches 1 --skip-tensorrt") with the
# venv's Python where there is one, else $(PYTHON): a GPU machine with PyTorch already installed.
GPU_BENCH_ARGS ?=
BENCH_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

# make perf: perf_analyzer against a running server (make serve); native where it works.
PERF_ANALYZER ?= $(if $(wildcard ../shared/tools/perf_analyzer),../shared/tools/perf_analyzer,perf_analyzer)
# Text-to-image by default; perf/img2img_cpu.json, perf/inpaint_cpu.json (and make perf-data's 1024² ones) for images;
# perf/ensemble_sdxl_jpeg_cpu.json (and _1024) for JPEG responses.
PERF_DATA ?= perf/ensemble_sdxl_cpu.json
# Up to the admitted capacity of the default configs (4 loops + max_queue_size 4): past it the server
# refuses requests by design (UNAVAILABLE), which perf_analyzer counts as errors and stops on.
PERF_CONCURRENCY ?= 1 2 4 8

.PHONY: help install install-gpu install-deploy lock lock-deploy k8s-render export-tiny demo serve test clean engines engines-rtx production perf bench bench-scale \
  bench-gpu gpu-wheels perf-analyzer-check bench-faults bench-soak bench-fuzz bench-engine bench-stream bench-lora bench-painting bench-img2img bench-outputs bench-refiner bench-quant bench-security bench-start bench-controlnet bench-ipadapter perf-data

help:
	@echo "make demo         main job: set up, export the tiny SDXL, serve it on tritonserver, write build/demo.png"
	@echo "make serve        supervised tritonserver in the foreground on $(REPOSITORY)/ (HOST (127.0.0.1), HTTP_PORT, GRPC_PORT,"
	@echo "                  METRICS_PORT, HEALTH_PORT, ADMIN_KEY_FILE, DRAIN_TIMEOUT_S, EXIT_TIMEOUT_S, PROMPT_CACHE_MB, TRACE_FILE, TRACE_RATE, VARIANT); SIGTERM or Ctrl-C drains"
	@echo "make install      venv in $(VENV) with the pinned CPU stack and the bundled tritonserver (idempotent)"
	@echo "make export-tiny  tiny random-weight SDXL -> $(TINY_DIR), its ONNX graphs -> $(REPOSITORY)/"
	@echo "make test         the test suite"
	@echo "make engines-rtx  TensorRT-RTX engines of $(REPOSITORY)/'s graphs -> build/engines-rtx/ (no GPU needed)"
	@echo "make engines      TensorRT plans of $(REPOSITORY)/'s graphs, in place (GPU box, after make install-gpu)"
	@echo "make production   GPU box: export SDXL + LCM-LoRA + fp16-fix VAE, build the plans, serve them"
	@echo "make perf         perf_analyzer on ensemble_sdxl of a running server (PERF_ANALYZER, PERF_DATA, PERF_CONCURRENCY; the admin key)"
	@echo "make perf-data    img2img and inpainting perf data at 1024² -> build/perf/ (128² ones: perf/)"
	@echo "make bench        the throughput benchmark: results in $(BENCH_RESULTS)/"
	@echo "make bench-faults kill -9 of each stub, overload, drain, cancellation, /dev/shm: $(BENCH_RESULTS)/faults_cpu.md"
	@echo "make bench-soak   2,000 mixed requests at concurrency 8: failures, memory growth: $(BENCH_RESULTS)/soak.md"
	@echo "make bench-fuzz   the fuzz tests' request generators at length: $(BENCH_RESULTS)/fuzz.md"
	@echo "make bench-start  make serve launched to ready (median of 3), per model, per process, imports: $(BENCH_RESULTS)/start_cpu.md"
	@echo "make bench-security admin APIs with and without the key, listening addresses, 2.51's crashing requests and the restarts, oversized requests: $(BENCH_RESULTS)/security_cpu.md"
	@echo "make bench-engine continuous batching against the loop design (perf_analyzer, 256² and 512²): $(BENCH_RESULTS)/engine_cpu.md"
	@echo "make bench-stream sdxl_stream: time to first preview, preview cost per step, cancel to slot free: $(BENCH_RESULTS)/stream_cpu.md"
	@echo "make bench-painting real-time painting: 512² img2img frames over gRPC, fps, time outside the networks, sessions (skipped frames): $(BENCH_RESULTS)/painting_cpu.md"
	@echo "make bench-img2img img2img memory: SDXL's VAE graphs at full size to 1536², the tiny server at 1536² x 4: $(BENCH_RESULTS)/img2img_cpu.md"
	@echo "make bench-outputs PNG/JPEG/WebP and the watermark per image, raw vs JPEG responses over gRPC and HTTP: $(BENCH_RESULTS)/outputs_cpu.md"
	@echo "make bench-refiner the standard recipe and the refiner: served (tiny), each UNet's work, the full-size refiner, a GPU estimate: $(BENCH_RESULTS)/refiner_cpu.md"
	@echo "make bench-quant  8-bit UNet (fp8, int8) and VAE (int8): error against float, CPU speed, sensitivity sweep, TensorRT-RTX: $(BENCH_RESULTS)/quantization_cpu.md"
	@echo "make bench-controlnet ControlNets: images/s with 0, 1, 2, union modes, server-made depth and a mixed load, full-size steps and engines, FLOPs, a GPU estimate: $(BENCH_RESULTS)/controlnet_cpu.md"
	@echo "make bench-ipadapter IP-Adapter image prompts: images/s with and without one, the image encoder per request, full-size exports, FLOPs, a GPU estimate: $(BENCH_RESULTS)/ipadapter_cpu.md"
	@echo "make bench-lora   per-request LoRAs: unet_lora by rank vs unet, mixed vs single-LoRA traffic, library: $(BENCH_RESULTS)/lora_cpu.md"
	@echo "make bench-scale  full-size SDXL (random weights) exported, built and served here: $(BENCH_RESULTS)/scale_cpu.md"
	@echo "make bench-gpu    GPU benchmark: SDXL 1024², 4 steps, diffusers vs the project's loop vs TensorRT (GPU_BENCH_ARGS)"
	@echo "make gpu-wheels   download requirements/gpu-bench.txt's wheels for Python 3.12 into build/wheels (offline GPU machine)"
	@echo "make install-gpu  add the GPU extras (see requirements/gpu.in; $(TRT_WHEEL)==$(TRT_VERSION), Triton $(TRITON_RELEASE))"
	@echo "make k8s-render   the Helm chart rendered offline (VALUES=file) -> build/k8s/rendered.yaml, linted and validated"
	@echo "make install-deploy  the deployment tools' venv $(DEPLOY_VENV) (Helm SDK, kubernetes-validate, checkov, hadolint)"
	@echo "make lock         re-pin requirements/base.txt from requirements/base.in"

# Re-runs only when the lock file changes.
$(VENV)/.installed: requirements/base.txt requirements/no-deps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/base.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/no-deps.txt
	touch $@

install: $(VENV)/.installed

install-gpu: install
	$(PY) -m pip uninstall --quiet --yes onnxruntime  # onnxruntime-gpu ships the same module
	$(PY) -m pip install --quiet -r requirements/gpu.in $(TRT_WHEEL)==$(TRT_VERSION)

# Re-runs only when the deployment tools' lock changes.
$(DEPLOY_VENV)/.installed: requirements/deploy.txt
	test -x $(DEPLOY_PY) || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_PY) -m pip install --quiet --disable-pip-version-check -r requirements/deploy.txt
	touch $@

install-deploy: $(DEPLOY_VENV)/.installed

lock-deploy: install-deploy
	$(DEPLOY_PY) -m pip install --quiet -r requirements/deploy.in
	{ echo "# Generated by 'make lock-deploy' from requirements/deploy.in: every package pinned."; \
	  $(DEPLOY_PY) -m pip freeze; } > requirements/deploy.txt

# No helm binary, no cluster: the Helm SDK renders and lints; every object is validated against the
# Kubernetes 1.29 and 1.33 schemas.
k8s-render: install-deploy
	$(DEPLOY_PY) -m deploy.render --lint --namespace $(K8S_NAMESPACE) $(foreach f,$(VALUES),--values $(f)) --out build/k8s/rendered.yaml
	$(DEPLOY_PY) -m deploy.validate build/k8s/rendered.yaml

lock: install
	$(PY) -m pip install --quiet -r requirements/base.in
	{ echo "# Generated by 'make lock' from requirements/base.in: every package pinned."; \
	  $(PY) -m pip freeze --exclude-editable --exclude nvidia-pytriton --exclude invisible-watermark | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements/base.txt

# The last file `export random` writes (a tiny directory from before the IP-Adapters is written again).
$(TINY_DIR)/ip_adapter/ip-adapter-plus.safetensors: | install
	$(PY) -m export random $(TINY_DIR) --arch tiny

export-tiny: $(TINY_DIR)/ip_adapter/ip-adapter-plus.safetensors
	$(PY) -m export onnx --model $(TINY_DIR) --lora $(TINY_DIR)/lora --vae $(TINY_DIR)/alt_vae \
	  --preview-vae $(TINY_DIR)/preview_vae --safety-checker $(TINY_DIR)/safety_checker \
	  --controlnet tiny=$(TINY_DIR)/controlnet --controlnet canny=$(TINY_DIR)/controlnet --controlnet-preprocessor canny=canny \
	  --controlnet union=$(TINY_DIR)/controlnet_union --depth-estimator $(TINY_DIR)/depth_estimator \
	  --ip-adapter $(TINY_DIR)/ip_adapter/ip-adapter.safetensors --image-encoder $(TINY_DIR)/image_encoder \
	  --dtype $(DTYPE) --out $(REPOSITORY)

demo: export-tiny
	$(PY) -m serving.demo --repository $(REPOSITORY)

serve: install
	$(PY) -m serving.server --repository $(REPOSITORY) --variant $(VARIANT) --host $(HOST) $(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE)) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --health-port $(HEALTH_PORT) \
	  --drain-timeout-s $(DRAIN_TIMEOUT_S) --exit-timeout-s $(EXIT_TIMEOUT_S) --prompt-cache-mb $(PROMPT_CACHE_MB) \
	  $(if $(TRACE_FILE),--trace-file $(TRACE_FILE) --trace-rate $(TRACE_RATE))

engines-rtx: install
	POLYGRAPHY_USE_TENSORRT_RTX=1 $(PY) -m export engines --onnx $(REPOSITORY)

engines: install
	$(PY) -m export engines --onnx $(REPOSITORY) --out $(REPOSITORY)

# The production flow on a GPU box (docs/engines.md, "Production on a GPU"): about 20 GB of downloads.
production: install
	$(PY) -m export onnx --device cuda --out $(REPOSITORY)
	$(PY) -m export engines --onnx $(REPOSITORY) --out $(REPOSITORY)
	$(MAKE) serve VARIANT=production

# perf_analyzer reads model configs and statistics, admin APIs: it sends the key as gRPC metadata (-H).
perf: | perf-analyzer-check
	@key="$${SDXL_ADMIN_KEY:-$$(cat $(or $(ADMIN_KEY_FILE),build/admin-key) 2>/dev/null)}"; \
	if [ -z "$$key" ]; then echo "error: no admin key: start the server with make serve (it writes build/admin-key), or set \
	SDXL_ADMIN_KEY or ADMIN_KEY_FILE to the server's key (docs/security.md)" >&2; exit 2; fi; \
	for c in $(PERF_CONCURRENCY); do \
	  echo "$(PERF_ANALYZER) -m ensemble_sdxl -u localhost:$(GRPC_PORT) -i grpc --input-data $(PERF_DATA) --concurrency-range $$c -H triton-grpc-protocol-admin-key:<key> ..."; \
	  $(PERF_ANALYZER) -m ensemble_sdxl -u localhost:$(GRPC_PORT) -i grpc --input-data $(PERF_DATA) \
	    --concurrency-range $$c --measurement-interval 5000 --percentile 95 -H "triton-grpc-protocol-admin-key:$$key" || exit 1; \
	done

# perf_analyzer data for img2img and inpainting at production size (4 MB each of base64: not committed).
perf-data: install
	$(PY) -m benchmarks.perf_data --size 1024 --out build/perf

bench: install | perf-analyzer-check
	$(PY) -m pip install --quiet -r requirements/bench.in
	$(PY) -m benchmarks.throughput

bench-faults: install
	$(PY) -m benchmarks.faults

bench-soak: install
	$(PY) -m benchmarks.soak

# About 25 minutes on 2 cores.
bench-engine: install | perf-analyzer-check
	$(PY) -m benchmarks.engine

bench-stream: install
	$(PY) -m benchmarks.streaming

bench-painting: install
	$(PY) -m benchmarks.painting

bench-img2img: install
	$(PY) -m benchmarks.img2img

bench-outputs: install
	$(PY) -m benchmarks.outputs

bench-refiner: install
	$(PY) -m benchmarks.refiner

bench-quant: install
	$(PY) -m benchmarks.quantization

bench-fuzz: install
	$(PY) -m benchmarks.fuzz

bench-security: install
	$(PY) -m benchmarks.security

# make serve launched to ready on make demo's repository (exported first if it is not there).
bench-start: install
	test -f $(REPOSITORY)/ensemble_sdxl/config.pbtxt || $(MAKE) --no-print-directory export-tiny
	$(PY) -m benchmarks.start --repository $(REPOSITORY)

# ControlNets: served (tiny, 0, 1, 2 and mixed), a full-size ControlNet step, FLOPs (about 6 minutes, 15 GiB).
bench-controlnet: install
	$(PY) -m benchmarks.controlnet

# IP-Adapter image prompts: FLOPs, the full-size image encoder and unet_ip exported, served (tiny, with and
# without an image prompt, and a server without IP-Adapter) (about 11 minutes, 9 GiB).
bench-ipadapter: install
	$(PY) -m benchmarks.ipadapter

# Per-request LoRAs: the UNet step by LoRA rank against the graph without LoRA inputs, and the library
# (tiny, a few minutes); LORA_BENCH_ARGS="--arch sdxl" for SDXL's size (about 20 GB of memory).
LORA_BENCH_ARGS ?=
bench-lora: install
	$(PY) -m benchmarks.lora $(LORA_BENCH_ARGS)

# About 35 minutes and 35 GB of disk (build/scale/) on 2 cores; its skeleton graphs go to build/scale/ too.
bench-scale: install
	$(PY) -m benchmarks.scale

# The GPU benchmark (docs/benchmarks.md): results in $(BENCH_RESULTS)/gpu_<GPU name>.{json,md}.
# Not behind install: the GPU machine has no network.
bench-gpu:
	$(BENCH_PYTHON) -m benchmarks.gpu $(GPU_BENCH_ARGS)

# The wheels the GPU benchmark needs beyond what the GPU machine has, for Python 3.12.
gpu-wheels:
	$(BENCH_PYTHON) -m pip download --only-binary=:all: --no-deps --python-version 3.12 -d build/wheels -r requirements/gpu-bench.txt

perf-analyzer-check:
	@command -v $(PERF_ANALYZER) >/dev/null || { echo "error: perf_analyzer not found ($(PERF_ANALYZER)): install it with \
	\`pip install perf-analyzer\` (glibc 2.38 or newer) or use NVIDIA's Triton SDK container, or set PERF_ANALYZER=/path/to/perf_analyzer" >&2; exit 2; }

# Ends with the ten slowest tests and the number of tritonserver starts (tests/conftest.py): what keeps it fast.
test: install install-deploy
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

# Removes every build output (build/), and the export outputs that releases before build/model_repository
# wrote into the tracked templates (model_repository/, ignored by git).
clean:
	rm -rf build model_repository/*/1/model.onnx model_repository/*/1/model.onnx.data model_repository/*/1/export.json \
	  model_repository/*/1/model.plan model_repository/*/1/model.plan.json \
	  model_repository/tokenizer/1/tokenizer model_repository/tokenizer/1/tokenizer_2 \
	  model_repository/scheduler/1/scheduler_config.json model_repository/scheduler/1/recipe.json
