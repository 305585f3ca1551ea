"""The continuous-batching engine (serving/engine.py) without a server: requests joining and leaving
at every step get the latents each gets alone; shapes that cannot share a batch wait for their own;
no request starves; a cancelled request stops and frees its rows; a failing UNet call fails only its
batch."""

from __future__ import annotations

import threading

import pytest
import torch
from reference import recipe_scheduler

from export.modules import UNet
from serving.denoise import Denoiser, denoise
from serving.endpoint import Cancelled, GenerationOptions
from serving.engine import Job, StepEngine

TEXT, POOLED = 80, 40  # the tiny pipeline's widths


def embeddings(seed: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = 2 if cfg else 1
    return torch.randn(rows, 77, TEXT, generator=generator), torch.randn(rows, POOLED, generator=generator)


def make_denoiser(pipe, options: GenerationOptions, scheduler: str = "lcm", eta=None) -> Denoiser:
    embeds, pooled = embeddings(options.seed, options.do_classifier_free_guidance)
    return Denoiser(options, embeds, pooled, recipe_scheduler(pipe, scheduler), eta=eta)


REQUESTS = [  # (options, scheduler, eta, iteration it arrives at)
    (GenerationOptions(1, 4, 1.0, 128, 128, 1), "lcm", None, 0),
    (GenerationOptions(2, 2, 2.0, 128, 128, 2), "euler-ancestral", None, 0),
    (GenerationOptions(3, 3, 0.0, 128, 128, 1), "tcd", 0.3, 1),
    (GenerationOptions(4, 1, 1.5, 128, 128, 1), "ddim", None, 2),
    (GenerationOptions(5, 4, 1.0, 128, 192, 2), "euler", None, 1),  # another shape: its own batches
    (GenerationOptions(6, 2, 1.0, 128, 128, 3), "lcm", None, 3),
]


@pytest.fixture(scope="module")
def unet_fn(loaded):
    unet = UNet(loaded("fp32").pipe.unet)

    def run(inputs):
        with torch.no_grad():
            return unet(**inputs)

    return run


def test_requests_joining_and_leaving_get_their_own_latents(loaded, unet_fn):
    pipe = loaded("fp32").pipe
    alone = [denoise(unet_fn, make_denoiser(pipe, o, s, e)) for o, s, e, _ in REQUESTS]
    calls = []
    engine = StepEngine(lambda inputs: calls.append(inputs["sample"].shape[0]) or unet_fn(inputs), max_rows=8)
    results: dict[int, torch.Tensor] = {}
    arrivals = sorted(range(len(REQUESTS)), key=lambda i: REQUESTS[i][3])
    iteration = 0
    while len(results) < len(REQUESTS):
        for index in [i for i in arrivals if REQUESTS[i][3] == iteration]:
            options, scheduler, eta, _ = REQUESTS[index]
            engine.submit(Job(make_denoiser(pipe, options, scheduler, eta),
                              on_done=lambda latents, index=index: results.__setitem__(index, latents),
                              on_error=lambda error: pytest.fail(str(error))))
        engine.run_iteration()
        iteration += 1
        assert iteration < 100
    for index, expected in enumerate(alone):
        # The same math; only the kernels' batch-size-dependent summation order differs.
        assert torch.allclose(results[index], expected, atol=1e-4, rtol=1e-4), (index, (results[index] - expected).abs().max())
    assert max(calls) <= 8 and max(calls) > 4  # batches of several requests formed
    assert sum(calls) == sum(o.num_images_per_prompt * (2 if o.do_classifier_free_guidance else 1) * o.num_inference_steps
                             for o, *_ in REQUESTS)  # every step of every request, once


def test_a_batch_carries_lora_weights_only_when_a_request_in_it_has_loras(loaded, unet_fn):
    """A step in which no request names LoRAs runs the plain UNet (no LoRA tensors: `unet`); once a
    request with LoRAs joins, the batch carries them (`unet_lora`): ranks padded to the largest,
    zeros for the request without; each request still gets its latents alone."""
    pipe = loaded("fp32").pipe
    sites = UNet(pipe.unet).lora_sites
    generator = torch.Generator().manual_seed(0)

    def lora(rank: int) -> dict[str, torch.Tensor]:
        return {"lora_down": torch.randn(1, rank, sites.lora_in, generator=generator) * 0.05,
                "lora_up": torch.randn(1, sites.lora_out, rank, generator=generator) * 0.05}

    loras = [None, lora(2), lora(4)]

    def make(index: int) -> Denoiser:
        options = GenerationOptions(index, 3, 1.0, 128, 128, 1)
        embeds, pooled = embeddings(index, False)
        return Denoiser(options, embeds, pooled, recipe_scheduler(pipe, "lcm"), lora=loras[index])

    alone = [denoise(unet_fn, make(i)) for i in range(3)]
    calls, results = [], {}

    def record(inputs):
        down, up = inputs.get("lora_down"), inputs.get("lora_up")
        zero_rows = None if down is None else sum(int(not down[i].any() and not up[i].any()) for i in range(len(down)))
        calls.append((inputs["sample"].shape[0], None if down is None else tuple(down.shape[:2]), zero_rows))
        return unet_fn(inputs)

    engine = StepEngine(record, max_rows=8)
    for index in range(3):
        engine.submit(Job(make(index), on_done=lambda latents, index=index: results.__setitem__(index, latents),
                          on_error=lambda error: pytest.fail(str(error))))
        if index == 0:
            engine.run_iteration()  # the first step: that request alone
    while engine.active or engine.size:
        engine.run_iteration()
    # The LoRA-free request alone, then with both others (zeros for it), then the last steps of those two.
    assert calls == [(1, None, None), (3, (3, 4), 1), (3, (3, 4), 1), (2, (2, 4), 0)], calls
    for index, expected in enumerate(alone):
        assert torch.allclose(results[index], expected, atol=1e-4, rtol=1e-4), (index, (results[index] - expected).abs().max())


def test_shapes_that_differ_never_share_a_call(loaded, unet_fn):
    pipe = loaded("fp32").pipe
    shapes = []
    engine = StepEngine(lambda inputs: shapes.append(tuple(inputs["sample"].shape[2:])) or unet_fn(inputs), max_rows=8)
    for seed, (height, width) in enumerate([(128, 128), (128, 192), (128, 128), (192, 128)]):
        engine.submit(Job(make_denoiser(pipe, GenerationOptions(seed, 2, 1.0, height, width, 1)), on_done=lambda _: None,
                          on_error=lambda error: pytest.fail(str(error))))
    while engine.active or engine.size:
        engine.run_iteration()
    assert sorted(set(shapes)) == [(16, 16), (16, 24), (24, 16)]
    assert shapes.count((16, 16)) == 2  # the two 128x128 requests: one call per step, together


def test_no_request_starves(loaded):
    """max_rows 2, one iteration per UNet call, and a new short request of another size at every
    iteration (as many as the engine can step): a long request of a third size still gets a step
    every few iterations. Under the earlier policy (least recently stepped first, new requests
    counted as never stepped) it got one step and starved."""
    pipe = loaded("fp32").pipe
    engine = StepEngine(lambda inputs: torch.zeros_like(inputs["sample"]), max_rows=2)
    long = engine.submit(Job(make_denoiser(pipe, GenerationOptions(0, 8, 1.0, 192, 192, 1)), on_done=lambda _: None,
                             on_error=lambda error: pytest.fail(str(error))))
    served = []
    for iteration in range(40):
        size = (128, 256)[iteration % 2]  # new short requests of two other sizes keep arriving
        engine.submit(Job(make_denoiser(pipe, GenerationOptions(iteration, 1, 1.0, size, size, 1)),
                          on_done=lambda _: None, on_error=lambda error: pytest.fail(str(error))))
        engine.run_iteration()
        if long.last_served == engine.iteration - 1:
            served.append(engine.iteration - 1)
        if long.denoiser.done:
            break
    assert long.denoiser.done, served
    gaps = [b - a for a, b in zip(served, served[1:])]
    # Ready at k, it waits only for the requests ready before k, never for later arrivals.
    assert len(served) == 8 and max(gaps) <= 3, served


def test_cancelled_request_stops_and_frees_its_rows(loaded, unet_fn):
    pipe = loaded("fp32").pipe
    rows = []
    engine = StepEngine(lambda inputs: rows.append(inputs["sample"].shape[0]) or unet_fn(inputs), max_rows=8)
    flag = threading.Event()
    errors, done = [], []
    victim = engine.submit(Job(make_denoiser(pipe, GenerationOptions(1, 6, 1.0, 128, 128, 2)), on_done=done.append,
                               on_error=errors.append, cancelled=flag.is_set))
    other = engine.submit(Job(make_denoiser(pipe, GenerationOptions(2, 6, 1.0, 128, 128, 1)), on_done=done.append,
                              on_error=lambda error: pytest.fail(str(error))))
    engine.run_iteration()
    engine.run_iteration()
    flag.set()
    while engine.active:
        engine.run_iteration()
    assert victim.denoiser.step_index == 2 and isinstance(errors[0], Cancelled)
    assert "cancelled before denoising step 3 of 6" in str(errors[0])
    assert rows == [3, 3, 1, 1, 1, 1] and len(done) == 1 and other.denoiser.done


def test_failing_unet_call_fails_its_batch_only(loaded, unet_fn):
    pipe = loaded("fp32").pipe
    fail_shape = (16, 24)

    def unet(inputs):
        if tuple(inputs["sample"].shape[2:]) == fail_shape:
            raise RuntimeError("unet: out of memory")
        return unet_fn(inputs)

    engine = StepEngine(unet, max_rows=8)
    outcome = {}
    for name, width in (("bad", 192), ("good", 128)):
        engine.submit(Job(make_denoiser(pipe, GenerationOptions(1, 2, 1.0, 128, width, 1)),
                          on_done=lambda _, name=name: outcome.__setitem__(name, "done"),
                          on_error=lambda error, name=name: outcome.__setitem__(name, str(error))))
    while engine.active or engine.size:
        engine.run_iteration()
    assert outcome == {"bad": "unet: out of memory", "good": "done"}


def test_engine_thread_serves_and_stops(loaded, unet_fn):
    pipe = loaded("fp32").pipe
    engine = StepEngine(unet_fn, max_rows=8)
    thread = threading.Thread(target=engine.serve_forever, daemon=True)
    thread.start()
    finished = threading.Event()
    engine.submit(Job(make_denoiser(pipe, GenerationOptions(1, 2, 1.0, 128, 128, 1)), on_done=lambda _: finished.set(),
                      on_error=lambda error: pytest.fail(str(error))))
    assert finished.wait(30)
    stranded = []
    engine.submit(Job(make_denoiser(pipe, GenerationOptions(1, 50, 1.0, 128, 128, 1)), on_done=lambda _: None,
                      on_error=stranded.append))
    engine.stop()
    thread.join(30)
    assert not thread.is_alive() and (not stranded or isinstance(stranded[0], Cancelled))


def test_a_request_over_the_unet_batch_is_refused(loaded):
    engine = StepEngine(lambda inputs: inputs["sample"], max_rows=4)
    with pytest.raises(ValueError, match="8 UNet rows in one request; the UNet takes at most 4"):
        engine.submit(Job(make_denoiser(loaded("fp32").pipe, GenerationOptions(1, 2, 2.0, 128, 128, 4)),
                          on_done=lambda _: None, on_error=lambda _: None))


def test_denoiser_config_agrees_with_the_scheduler_and_the_unet():
    """The denoiser checks requests as the scheduler does and fills the unet's batch: its limits,
    recipe and max_rows are the scheduler's and the unet's max_batch_size, in both variants."""
    from contract.configs import parameters, read_config
    from contract.layout import TEMPLATES
    from contract.recipes import RECIPE_PARAMETERS

    for variant in ("production", "cpu"):
        denoiser = read_config(TEMPLATES, "denoiser", variant)
        ours, theirs = parameters(denoiser), parameters(read_config(TEMPLATES, "scheduler", variant))
        for key in ("min_size", "max_size", "max_images", "cfg_end_fraction", "device", *RECIPE_PARAMETERS):
            assert ours[key] == theirs[key], (variant, key)
        assert int(ours["max_rows"]) == read_config(TEMPLATES, "unet", variant).max_batch_size
        assert denoiser.model_transaction_policy.decoupled and len(denoiser.instance_group) == 1
        assert denoiser.instance_group[0].count == 1  # one engine: every request in one batch


def test_controlnet_requests_share_calls_and_each_gets_its_own_latents(loaded, exported, unet_fn):
    """Requests with one or two ControlNets (windows, scales), with LoRA-free and plain rows, stepped
    together with the ControlNet calls cut at 3 rows: each request's latents equal its loop alone; a
    ControlNet call holds the rows of every request that runs it at that step."""
    from contract.networks import ModelDims
    from export.modules import ControlNet
    from serving.controlnets import ControlSpec
    from serving.denoise import RequestControls

    pipe = loaded("fp32").pipe
    exported("fp32")  # gives the pipeline its ControlNet
    controlnet = ControlNet(pipe.controlnet).eval()
    calls = []

    def controlnet_fn(model, inputs):
        calls.append((model, inputs["sample"].shape[0]))
        with torch.no_grad():
            return controlnet(**inputs)

    generator = torch.Generator().manual_seed(0)
    image = lambda: torch.randint(0, 256, (1, 128, 128, 3), generator=generator, dtype=torch.uint8)  # noqa: E731
    dims = ModelDims.from_pipeline(pipe)
    widths = (dims.unet_lora_in, dims.unet_lora_out)  # no request here has LoRAs: unet_control gets zeros of these
    specs = {
        "one": (ControlSpec("tiny", "controlnet_tiny", 0.7, 0.0, 1.0, False, 0),),
        "two": (ControlSpec("tiny", "controlnet_tiny", 1.2, 0.0, 0.5, False, 0), ControlSpec("canny", "controlnet_canny", 0.5, 0.25, 1.0, False, 1)),
    }
    images = {name: tuple(image() for _ in spec) for name, spec in specs.items()}
    cases = [(GenerationOptions(11, 4, 1.0, 128, 128, 1), "one"), (GenerationOptions(12, 4, 2.0, 128, 128, 1), "two"),
             (GenerationOptions(13, 4, 1.0, 128, 128, 2), None)]

    def make(options, kind):
        embeds, pooled = embeddings(options.seed, options.do_classifier_free_guidance)
        controls = None if kind is None else RequestControls(specs[kind], images[kind], widths)
        return Denoiser(options, embeds, pooled, recipe_scheduler(pipe, "lcm"), controls=controls)

    alone = [denoise(unet_fn, make(options, kind), controlnet=controlnet_fn) for options, kind in cases]
    calls.clear()
    engine = StepEngine(unet_fn, max_rows=3, controlnet=controlnet_fn)
    results = {}
    for i, (options, kind) in enumerate(cases):
        engine.submit(Job(make(options, kind), on_done=lambda latents, i=i: results.__setitem__(i, latents), on_error=pytest.fail))
    while len(results) < len(cases):
        engine.run_iteration()
    for i, latents in enumerate(alone):  # the batch-size-dependent summation order alone differs
        assert torch.allclose(results[i], latents, atol=1e-4, rtol=1e-4), (i, (results[i] - latents).abs().max())
    assert all(rows <= 3 for _, rows in calls)
    assert {model for model, _ in calls} == {"controlnet_tiny", "controlnet_canny"}
