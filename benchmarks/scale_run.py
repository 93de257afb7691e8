"""The scale run: SD 1.5's architecture with random weights at 512x512 (latents 64x64, N = 4096
self-attention tokens), trace + single-head zero-ablations of one layer under a memory budget.

    python benchmarks/scale_run.py build FOLDER     # the pipeline folder (random weights, no text encoder)
    python benchmarks/scale_run.py run FOLDER OUT   # prints and writes OUT/scale_run.json
    python benchmarks/scale_run.py run FOLDER OUT --ablation-images 4 --ablation-timesteps 250,750 --no-trace
                                              # the ablations alone, on all 8 images at both timesteps
    python benchmarks/scale_run.py run FOLDER OUT --no-ablations   # load, encode and trace alone

SD 1.5's text encoder needs CLIP's vocabulary, which is not on an offline machine: the prompt is a
random (1, 77, 768) prompt_embeds file instead (the path of --prompt-embeds).
"""

import json
import time
from pathlib import Path

import torch

from diffcirc.bench.measure import status_bytes

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # self-attention over the 64x64 latent grid
IMAGES = 4          # per dataset: 4 synthetic + 4 natural = 8 images, traced at both timesteps
TIMESTEPS = [250, 750]
ABLATION_IMAGES = 2  # per dataset, ablated at ABLATION_TIMESTEPS (what a 2-core CPU runs in minutes)
ABLATION_TIMESTEPS = [750]
MAX_MEMORY = 4 << 30


def build(folder: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # stable-diffusion-v1-5's unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(  # its vae/config.json
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=512, scaling_factor=0.18215)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet.eval(), scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    save_file({"prompt_embeds": torch.randn(1, 77, 768)}, str(folder / "prompt_embeds.safetensors"))


def materialising_bytes(session, batch: int, text_tokens: int) -> dict:
    """What a tracer that materialises attention probabilities (float32) would hold for one forward
    pass of ``batch`` images: the largest layer's maps alone, and every layer's (an attention store)."""
    sizes = []
    for layer in session.layers:
        n_q = layer.grid[0] * layer.grid[1]
        n_k = n_q if layer.kind == "self" else text_tokens
        sizes.append(batch * layer.heads * n_q * n_k * 4)
    return {"largest_layer": max(sizes), "all_layers": sum(sizes)}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the resident memory now


def run(folder: Path, out: Path, ablation_images: int = ABLATION_IMAGES, ablation_timesteps=ABLATION_TIMESTEPS,
        trace: bool = True, ablations: bool = True) -> dict:
    from diffcirc.analysis.config import AnalysisConfig
    from diffcirc.analysis.phases import Experiment

    config = AnalysisConfig(out=str(out), model=str(folder), prompt_embeds=str(folder / "prompt_embeds.safetensors"),
                            synthetic=IMAGES, synthetic_spec="synthetic-gray", natural="lfw", natural_n=IMAGES,
                            timesteps=TIMESTEPS, ablation_timesteps=ablation_timesteps, ablation_images=ablation_images,
                            ablation_modes=("zero",), random_control=False, batch_size=IMAGES, max_memory=MAX_MEMORY)
    result = {"threads": torch.get_num_threads(), "images": 2 * IMAGES, "timesteps": TIMESTEPS, "layer": LAYER,
              "ablation_images": 2 * ablation_images, "ablation_timesteps": ablation_timesteps, "trace": trace,
              "ablations": ablations, "max_memory": MAX_MEMORY}
    start = time.time()
    exp = Experiment(config)  # loads the pipeline, encodes the 8 images to latents (cached in OUT/latents)
    result["load_and_encode_s"] = time.time() - start
    result["size"], result["latent"] = exp.size, list(exp.data["natural"].x0.shape[1:])
    result["vae_passes"] = list(exp.cache.passes)  # images per VAE pass (none when read back from OUT/latents)
    result["load_peak_rss_gib"] = status_bytes("VmHWM") / 2 ** 30
    _reset_peak()  # the peaks below are the study's phases', not loading's
    result["rss_before_gib"] = status_bytes("VmRSS") / 2 ** 30
    passes, clock = [], []
    def started(module, args):  # returns None: the hook leaves the arguments as they are
        passes.append(int(args[0].shape[0]))
        clock.append(time.time())

    exp.unet.register_forward_pre_hook(started)
    exp.unet.register_forward_hook(lambda module, args, output: clock.append(time.time() - clock.pop()))
    start = time.time()
    if trace:
        exp.trace()
    result["trace_s"] = time.time() - start
    result["trace_passes"], result["trace_pass_s"] = list(passes), list(clock)
    result["trace_peak_rss_gib"] = status_bytes("VmHWM") / 2 ** 30
    passes[:], clock[:] = [], []
    result["weights_gib"] = sum(p.numel() * p.element_size() for p in exp.unet.parameters()) / 2 ** 30
    result["materialising_gib_per_pass"] = {k: v / 2 ** 30 for k, v in
                                            materialising_bytes(exp.session, IMAGES, 77).items()}
    name = "scale_run_trace.json" if not ablations else "scale_run.json" if trace else "scale_run_ablations.json"
    if not ablations:
        (out / name).write_text(json.dumps(result, indent=1))
        return result
    _reset_peak()
    exp.heads = [(LAYER, h) for h in range(exp.session.layer(LAYER).heads)]  # single-head ablations of one layer
    start = time.time()
    exp.ablations()
    result["ablations_s"] = time.time() - start
    result["ablation_passes"], result["ablation_pass_s"] = list(passes), list(clock)
    result["ablations_peak_rss_gib"] = status_bytes("VmHWM") / 2 ** 30
    layer = exp.session.layer(LAYER)
    result["tokens"] = layer.grid[0] * layer.grid[1]
    abl = exp.tables["ablations"]
    result["degradation_pct"] = (100 * (abl.loss_ablated - abl.loss_clean) / abl.loss_clean).describe().to_dict()
    result["rss_end_gib"] = status_bytes("VmRSS") / 2 ** 30
    (out / name).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["build", "run"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--ablation-images", type=int, default=ABLATION_IMAGES, help="per dataset")
    parser.add_argument("--ablation-timesteps", default=",".join(map(str, ABLATION_TIMESTEPS)))
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    args = parser.parse_args()
    if args.what == "build":
        build(args.folder)
    else:
        print(json.dumps(run(args.folder, args.out, args.ablation_images,
                             [int(t) for t in args.ablation_timesteps.split(",")], args.trace, args.ablations),
                         indent=1))
