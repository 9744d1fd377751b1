"""torch.compile of a UNet with LoLDU processors: one graph, no breaks, the eager outputs, and
no stale blend after weights, per-sample blends or adapter values change."""
import os
import tempfile

import torch
from tiny import tiny_unet, unet_inputs

from loldu_diffusion import LoLDUConfig, inject_loldu, iter_layers, load_adapter, save_adapter, set_adapter_weights
from loldu_diffusion.compile import compile_unet, is_compiled, uncompile_unet
from loldu_diffusion.serving import per_sample_adapters


def small_unet():
    """One cross-attention block per level (and the mid block): tracing stays a few seconds.
    Adapters "a" and "b" injected, "c" loaded from a file (rows of one table, as a server holds)."""
    unet = tiny_unet(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    for name, rank in (("a", 4), ("b", 2)):
        inject_loldu(unet, LoLDUConfig(rank=rank, init="uniform"), adapter_name=name)
    torch.manual_seed(1)
    for *_, layer in iter_layers(unet):
        for v in layer.adapters.values():
            v.z.requires_grad_(False).mul_(1 + torch.randn_like(v.z))  # adapters that change the output
            v.sigma.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(unet, os.path.join(tmp, "c.safetensors"), adapter_name="a")
        load_adapter(unet, os.path.join(tmp, "c.safetensors"), adapter_name="c")
    next(layer for *_, layer in iter_layers(unet)).adapters["c"].table.z.mul_(-0.5)  # (not a copy of "a")
    return unet


def test_unet_with_loldu_traces_as_one_graph_without_breaks():
    unet = small_unet()
    x, t, c = unet_inputs(unet)
    set_adapter_weights(unet, {"a": 1.0, "b": 0.5, "c": 0.7})
    with torch.no_grad():
        unet(x, t, c)  # eager: the cached blends exist, as compile_unet's pre-hook makes sure
        shared = torch._dynamo.explain(unet)(x, t, c)
    assert (shared.graph_count, shared.graph_break_count) == (1, 0), shared.break_reasons


def test_compiled_unet_equals_eager_and_sees_every_change():
    unet = small_unet()
    x, t, c = unet_inputs(unet)  # batch 2
    first = next(layer for *_, layer in iter_layers(unet))

    def states():  # each one a change a server makes between calls
        set_adapter_weights(unet, {"a": 1.0})
        yield "a"
        set_adapter_weights(unet, {"a": 0.3, "b": -1.0})
        yield "a+b"
        set_adapter_weights(unet, {"a": 0.6, "b": -1.0})
        yield "new weights"
        first.adapters["a"].z.mul_(2.0)  # an in-place edit of an adapter's values
        yield "edited values"
        set_adapter_weights(unet, {"c": 1.0, "b": 0.3})
        yield "a loaded adapter"
        first.adapters["c"].z.mul_(2.0)  # and of a loaded one's (a view of its table)
        yield "edited loaded values"
        with per_sample_adapters(unet, [{"b": 1.0}, {"a": 1.0}]):
            yield "per-sample"
        with per_sample_adapters(unet, [{"c": 1.0}, {"a": 0.5, "c": 0.5}]):
            yield "per-sample, loaded"

    with torch.no_grad():
        eager = {name: unet(x, t, c).sample for name in states()}
        first.adapters["a"].z.div_(2.0)  # (exact: a power of two)
        first.adapters["c"].z.div_(2.0)
        compile_unet(unet, backend="eager")  # dynamo's tracing and guards; inductor's codegen is torch's to test
        assert is_compiled(unet)
        compiled = {name: unet(x, t, c).sample for name in states()}
    assert len({float(v.abs().sum()) for v in eager.values()}) == len(eager)  # every change changes the output
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-6, rtol=1e-6, msg=name)
    uncompile_unet(unet)
    assert not is_compiled(unet) and "forward" not in unet.__dict__


def test_trainer_compile_trains_the_same_adapter(tiny_sd_path, concept_dir, tmp_path):
    """--compile traces the training forward (and, through AOT autograd, the backward) and gives
    the adapter eager training gives. aot_eager: dynamo and AOT autograd without inductor's code
    generation, whose fused kernels round differently (and compile for minutes on 2 cores)."""
    from safetensors.torch import load_file

    from loldu_diffusion.training import parse_args, train

    def run(out, extra):
        train(parse_args(["--pretrained_model_name_or_path", tiny_sd_path, "--instance_data_dir", concept_dir, "--instance_prompt",
                          "a photo of sks heart", "--output_dir", str(tmp_path / out), "--max_train_steps", "3", "--train_batch_size", "2",
                          "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none"] + extra))
        return load_file(str(tmp_path / out / "loldu_adapter.safetensors"))["unet.delta"]

    eager = run("eager", [])
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = run("compiled", ["--compile", "--compile_backend", "aot_eager"])
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert eager.abs().max() > 1e-4
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
