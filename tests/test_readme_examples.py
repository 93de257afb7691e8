"""The README's Python examples run as written, on tiny local stand-ins for the models they name
(only the model path, the device, the images and the output folder are substituted)."""

import re
from pathlib import Path

from helpers import tiny_pipelines as tp

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after_heading: str) -> str:
    """The first ```python block after the heading ``after_heading``."""
    text = README.read_text()
    start = text.index(after_heading)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    assert match, f"no python block after {after_heading!r}"
    return match.group(1)


def _substitute(code: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def test_daam_for_flux_example_writes_one_overlay_per_prompt_token(tmp_path, single_thread):
    folder = tmp_path / "flux"
    tp.flux_pipeline(folder)
    code = _substitute(_python_block("### DAAM for Flux, in Python"), {
        '"black-forest-labs/FLUX.1-dev", device="cuda", dtype=torch.bfloat16': f'{str(folder)!r}',
        "images = ...": "images = torch.rand(2, 3, 16, 16) * 2 - 1",  # 8 x 8 latents, 16 Flux tokens
        '"runs/daam-flux"': f'{str(tmp_path / "overlays")!r}',
    })
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    maps, prompt, table = scope["maps"], scope["prompt"], scope["table"]
    shown = prompt.shown_tokens()
    assert len(shown) >= 4  # "a photo of a face": its own tokens, not start/end/padding
    pngs = sorted((tmp_path / "overlays").rglob("*.png"))
    assert len(pngs) == 2 * len(shown)
    x0 = scope["x0"]
    assert set(table["image"]) == {0, 1} and len(table) == 2 * prompt.n_tokens * x0.shape[-2] * x0.shape[-1]
    # per head, an image query's mass on the text tokens is a share of its attention: summed over
    # tokens and heads (bilinear resampling mixes such sums convexly), it lies in (0, heads]
    heads = scope["pipe"].model.config.num_attention_heads
    total = table.groupby(["image", "row", "col"])["value"].sum()
    assert (total > 0).all() and (total <= heads + 1e-6).all()
    assert maps.count(0) > 0
