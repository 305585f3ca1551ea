"""The LoRA library (`python -m export lora`) and the unfused LoRA branches the graphs will carry:
a LoRA read through diffusers' loaders, stacked with scales and packed per set, gives what
diffusers' `load_lora_weights` + `set_adapters` gives on the same base, for the UNet and both text
encoders, sample by sample in a batch that mixes sets; and every bad LoRA leaves the library as
it was."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contract import layout, loras
from contract.loras import LORA_NETWORKS, LoraError, SiteTable
from export import lora as library
from export.modules import TextEncoders, UNet
from export.sources import ExportError, load_pipeline
from export.tiny import write_random_lora, write_style_lora
from serving.loras import Library, pack, rank_bucket, stack

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_RANK = 64


@pytest.fixture(scope="module")
def style_files(loaded, tmp_path_factory):
    """Random style LoRAs for the tiny pipeline: `a` (UNet + both text encoders, rank 4) as PEFT and
    as kohya files of the same weights; `b` (UNet only, attention only, rank 2)."""
    pipe = loaded("fp32").pipe
    root = tmp_path_factory.mktemp("style_loras")
    return {
        "a": write_style_lora(pipe, root / "a", seed=7),
        "a_kohya": write_style_lora(pipe, root / "a_kohya", seed=7, kohya=True),
        "b": write_style_lora(pipe, root / "b", seed=8, rank=2, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                              text_encoders=False),
    }


@pytest.fixture
def repository(exported, tmp_path):
    """What `lora add` reads of an exported repository: the site tables and the export's dtype."""
    repository = tmp_path / "repo"
    for network in LORA_NETWORKS:
        target = loras.sites_path(repository, network)
        target.parent.mkdir(parents=True)
        shutil.copy(loras.sites_path(exported("fp32"), network), target)
    layout.version_dir(repository, "unet").mkdir(parents=True)
    shutil.copy(layout.version_dir(exported("fp32"), "unet") / layout.EXPORT_INFO_FILE,
                layout.version_dir(repository, "unet") / layout.EXPORT_INFO_FILE)
    return repository


def library_state(repository: Path) -> list[str]:
    root = loras.library_dir(repository)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --- Installing ------------------------------------------------------------------------------------

def test_add_list_remove(repository, style_files):
    info = library.add(repository, "watercolor", str(style_files["a"]), MAX_RANK)
    assert (info.rank, info.networks) == (4, {"unet": 164, "text_encoder": 36})
    assert info.targets == ["attention", "convolution", "embedding", "feed-forward", "projection"]
    assert [i.name for i in loras.describe(repository)] == ["watercolor"]
    listing = library.listing(repository)
    assert "watercolor  4     attention, convolution" in listing and "unet 164, text_encoder 36" in listing
    library.remove(repository, "watercolor")
    assert loras.installed(repository) == {} and library_state(repository) == []


def test_the_library_can_live_elsewhere(repository, style_files, tmp_path, monkeypatch):
    """SDXL_LORA_LIBRARY names the library (the chart: a directory of the model volume, or one a
    sidecar syncs from a bucket); `lora add`, `lora list` and the serving models follow it."""
    elsewhere = tmp_path / "volume" / "loras"
    monkeypatch.setenv(loras.LIBRARY_ENV, str(elsewhere))
    library.add(repository, "ink", str(style_files["b"]), MAX_RANK)
    assert loras.installed(repository) == {"ink": elsewhere / "ink"} and (elsewhere / "ink" / loras.INFO_FILE).is_file()
    assert not (repository.parent / (repository.name + loras.LIBRARY_SUFFIX)).exists()
    assert Library.open(repository).get("ink").info.rank == 2
    listed = subprocess.run([sys.executable, "-m", "export", "lora", "list", "--repository", str(repository)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stdout.startswith("NAME") and "\nink  " in listed.stdout


def test_kohya_and_diffusers_files_of_one_lora_install_the_same_weights(repository, style_files):
    library.add(repository, "peft", str(style_files["a"]), MAX_RANK)
    library.add(repository, "kohya", str(style_files["a_kohya"].parent), MAX_RANK)  # a directory works too
    reader = Library.open(repository)
    peft, kohya = reader.get("peft").weights, reader.get("kohya").weights
    assert peft.keys() == kohya.keys()
    for network in peft:
        assert peft[network].keys() == kohya[network].keys()
        for site in peft[network]:
            for ours, theirs in zip(peft[network][site], kohya[network][site]):
                np.testing.assert_array_equal(ours, theirs)


def test_the_cli(repository, style_files):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "export", "lora", *args, "--repository", str(repository)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    added = run("add", "ink", str(style_files["b"]))
    assert added.returncode == 0, added.stderr
    assert "ink: rank 2, attention; unet 88 sites" in added.stdout
    listed = run("list")
    assert listed.returncode == 0 and "ink" in listed.stdout and "unet 88" in listed.stdout
    again = run("add", "ink", str(style_files["b"]))
    assert again.returncode == 2 and "'ink' is already in the library" in again.stderr
    assert run("remove", "ink").returncode == 0
    gone = run("remove", "ink")
    assert gone.returncode == 2 and "no LoRA 'ink' in the library" in gone.stderr and "Traceback" not in gone.stderr


@pytest.mark.parametrize("name", ["", "../../x", "a/b", ".hidden", "x" * 65, "spaced name"])
def test_bad_names_are_refused_before_any_file(repository, style_files, name):
    with pytest.raises(ExportError, match="NAME: .* is not a LoRA name; expected 1 to 64 of"):
        library.add(repository, name, str(style_files["b"]), MAX_RANK)
    with pytest.raises(LoraError, match="lora_names: .* is not a LoRA name"):
        Library.open(repository).get(name)
    assert library_state(repository) == []


def test_a_corrupt_file_is_refused_and_the_library_unchanged(repository, style_files, tmp_path):
    library.add(repository, "kept", str(style_files["b"]), MAX_RANK)
    before = library_state(repository)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(style_files["a"].read_bytes()[:5000])
    with pytest.raises(ExportError, match="cannot read it as a LoRA"):
        library.add(repository, "corrupt", str(corrupt), MAX_RANK)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(ExportError, match="cannot read it as a LoRA"):
        library.add(repository, "garbage", str(garbage), MAX_RANK)
    with pytest.raises(ExportError, match="no such file or directory"):
        library.add(repository, "missing", str(tmp_path / "nothing.safetensors"), MAX_RANK)
    assert library_state(repository) == before  # no half-written LoRA, no staging directory left


def test_a_lora_for_another_architecture_names_what_does_not_fit(repository, tmp_path):
    from diffusers import UNet2DConditionModel

    sd15_like = UNet2DConditionModel(  # SD 1.5's block layout: attention in the first down block
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4)
    path = write_random_lora(sd15_like, tmp_path / "sd15", seed=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with pytest.raises(ExportError, match="another architecture|another model size"):
        library.add(repository, "sd15", str(path), MAX_RANK)
    assert library_state(repository) == []


def test_a_rank_above_the_limit_is_refused(repository, style_files):
    with pytest.raises(ExportError, match="rank 4 is above this repository's max_lora_rank 2"):
        library.add(repository, "big", str(style_files["a"]), max_rank=2)
    assert library_state(repository) == []


def test_added_removed_and_replaced_loras_are_seen_at_once(repository, style_files):
    reader = Library.open(repository)
    with pytest.raises(LoraError, match=r"lora_names: 'live' is not in the LoRA library \(installed: none\)"):
        reader.get("live")
    library.add(repository, "live", str(style_files["b"]), MAX_RANK)
    held = reader.get("live")  # a request that holds it keeps it
    assert held.info.rank == 2
    library.remove(repository, "live")
    with pytest.raises(LoraError, match="not in the LoRA library"):
        reader.get("live")
    library.add(repository, "live", str(style_files["a"]), MAX_RANK)  # another LoRA under the same name
    assert reader.get("live").info.rank == 4 and held.info.rank == 2


# --- The math against diffusers ----------------------------------------------------------------------

def unet_example(pipe, batch: int):
    generator = torch.Generator().manual_seed(11)
    config = pipe.unet.config
    return (torch.randn(batch, config.in_channels, 16, 24, generator=generator),
            torch.randint(0, 1000, (batch,), generator=generator).float(),
            torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
            torch.randn(batch, pipe.text_encoder_2.config.projection_dim, generator=generator),
            torch.tensor([[128.0, 192.0, 0.0, 0.0, 128.0, 192.0]]).repeat(batch, 1))


def token_example(batch: int):
    generator = torch.Generator().manual_seed(12)
    return (torch.randint(0, 256, (batch, 77), generator=generator, dtype=torch.int32),
            torch.randint(0, 256, (batch, 77), generator=generator, dtype=torch.int32))


def diffusers_outputs(tiny_sources, files: dict, adapters: list[tuple[str, float]], unet_args, token_args):
    """The served base (LCM-LoRA fused, as the export loads it) with `adapters` loaded the diffusers
    way (`load_lora_weights`, `set_adapters`, unfused): UNet output and text embeddings."""
    pipe = load_pipeline(tiny_sources, "fp32").pipe
    for name in {name for name, _ in adapters}:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if adapters:
        pipe.set_adapters([name for name, _ in adapters], adapter_weights=[scale for _, scale in adapters])
    with torch.no_grad():
        return UNet(pipe.unet)(*unet_args), TextEncoders(pipe.text_encoder, pipe.text_encoder_2)(*token_args)


@pytest.fixture(scope="module")
def mixed_batch(loaded, tiny_sources, style_files, tmp_path_factory):
    """Three samples in one batch: a + b weighted, b alone, and no LoRA; the graphs' inputs packed by
    the library, and diffusers' output for each sample's LoRAs on their own."""
    repository = tmp_path_factory.mktemp("lora_repo")
    pipe = loaded("fp32").pipe
    tables = {"unet": UNet(pipe.unet).lora_sites, "text_encoder": TextEncoders(pipe.text_encoder, pipe.text_encoder_2).lora_sites}
    for network, table in tables.items():
        loras.sites_path(repository, network).parent.mkdir(parents=True)
        loras.sites_path(repository, network).write_text(table.to_json())
    library.add(repository, "a", str(style_files["a"]), MAX_RANK)
    library.add(repository, "b", str(style_files["b"]), MAX_RANK)
    reader = Library.open(repository)
    requests = [[("a", 0.7), ("b", -1.5)], [("b", 1.0)], []]
    unet_args, token_args = unet_example(pipe, 3), token_example(3)
    inputs = {}
    for network, table in tables.items():
        sets = [stack(table, [(reader.get(name), scale) for name, scale in request]) for request in requests]
        inputs[network] = {k: torch.from_numpy(v) for k, v in pack(table, sets, rank_bucket(6, 256)).items()}
    expected = [diffusers_outputs(loaded("fp32").sources, style_files, request, unet_args, token_args) for request in requests]
    return pipe, unet_args, token_args, inputs, expected


def test_rank_buckets():
    assert [rank_bucket(r, 256) for r in (0, 1, 2, 3, 6, 64, 65, 256)] == [1, 1, 2, 4, 8, 64, 128, 256]
    assert rank_bucket(300, 256) == 300  # past the limit: what it is (the request is refused elsewhere)


def test_each_sample_of_a_mixed_batch_equals_diffusers_set_adapters(mixed_batch):
    pipe, unet_args, token_args, inputs, expected = mixed_batch
    with torch.no_grad():
        noise = UNet(pipe.unet)(*unet_args, *inputs["unet"].values())
        embeds, pooled = TextEncoders(pipe.text_encoder, pipe.text_encoder_2)(*token_args, *inputs["text_encoder"].values())
    for sample, (ref_noise, (ref_embeds, ref_pooled)) in enumerate(expected):
        torch.testing.assert_close(noise[sample], ref_noise[sample], rtol=0, atol=2e-5)
        torch.testing.assert_close(embeds[sample], ref_embeds[sample], rtol=0, atol=2e-5)
        torch.testing.assert_close(pooled[sample], ref_pooled[sample], rtol=0, atol=2e-5)
    assert (noise[0] - expected[2][0][0]).abs().max() > 1e-2  # the LoRAs change the output
    # The modules are left as they were: without LoRA tensors, the base model.
    with torch.no_grad():
        torch.testing.assert_close(UNet(pipe.unet)(*unet_args)[2], noise[2], rtol=0, atol=0)


def test_the_unets_onnx_graph_with_lora_inputs_equals_pytorch(mixed_batch):
    pipe, unet_args, _, inputs, _ = mixed_batch
    module = UNet(pipe.unet).eval()
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "lora_down", "lora_up"]
    args = (*unet_args, *inputs["unet"].values())
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17, input_names=names, output_names=["noise_pred"],
                          dynamic_axes={"sample": {0: "batch", 2: "h", 3: "w"}, "timestep": {0: "batch"},
                                        "encoder_hidden_states": {0: "batch"}, "text_embeds": {0: "batch"},
                                        "time_ids": {0: "batch"}, "lora_down": {0: "batch", 1: "rank"},
                                        "lora_up": {0: "batch", 2: "rank"}})
        expected = module(*args)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: value.numpy() for name, value in zip(names, args)})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
