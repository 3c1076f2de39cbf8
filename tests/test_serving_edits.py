"""``POST /v1/images/edits`` (ralu_runtime.serving.edits) on a real server (127.0.0.1, a free port, stopped by the
fixtures) over a tiny random FLUX: img2img and inpainting equal ``generate`` alone (also packed with a generation
request), the official ``openai`` client's ``images.edit`` works unchanged, and every bad upload gets a 400 (413
over the upload limit) in the OpenAI shape with no engine work."""
import contextlib
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from ralu_runtime import generate
from ralu_runtime.serving import Engine, EngineConfig
from ralu_runtime.serving.http import EDITS_PATH, GENERATIONS_PATH, Server, create_app
from ralu_runtime.tiny import build_tiny
from openai_checks import assert_error, pngs

T = 120
DEFAULTS = dict(height=64, width=64, max_sequence_length=77)
KEY = "edits-test-key-0123456789"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("tiny-flux")


@contextlib.contextmanager
def running(pipe, config=None, **app_kwargs):
    """A server on 127.0.0.1:<free port> over a fresh engine; stopped (bounded) on exit."""
    engine = Engine(pipe, config or EngineConfig(gather_timeout_s=0.05), **DEFAULTS)
    server = None
    try:
        server = Server(create_app(engine, model_name="tiny-flux", **app_kwargs), "127.0.0.1", 0,
                        grace_s=5).start(timeout=60)
        yield server, engine
    finally:
        stopped = server.stop(timeout=35) if server is not None else True
        engine.shutdown(drain=False, timeout=30)
        assert stopped, "the server thread did not end"


@pytest.fixture(scope="module")
def served(pipe):
    with running(pipe, max_upload_bytes=64 * 1024, max_upload_pixels=512 * 512) as s:
        yield s


def png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def source(w=64, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def alpha_mask(w=64, h=64, box=(8, 8, 40, 32)) -> Image.Image:
    """OpenAI's convention: transparent (alpha 0) where to edit."""
    m = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), box)
    return m


def grey_mask(w=64, h=64, box=(8, 8, 40, 32)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def edit(server, fields=None, files=None, headers=None):
    files = files if files is not None else [("image", ("in.png", png(source()), "image/png"))]
    data = {"prompt": "a red fox", "seed": "3", "strength": "0.6", "steps": "3", "speedup": "none",
            **(fields or {})}
    data = {k: v for k, v in data.items() if v is not None}
    return httpx.post(server.url + EDITS_PATH, data=data, files=files, headers=headers, timeout=T)


def alone(pipe, image, **kw):
    out = generate(pipe, "a red fox", image=image, seed=3, output_type="pil", progress=False,
                   **{**DEFAULTS, **kw})
    return [np.asarray(im.convert("RGB")).astype(np.int16) for im in out.images]


def assert_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.abs(x - y).max() <= 1


# ----------------------------------------------------------------------------------------------- results
def test_img2img_equals_generate(served, pipe):
    server, _ = served
    got = pngs(edit(server))
    assert_close(got, alone(pipe, source(), strength=0.6, num_inference_steps=3, speedup=None))


@pytest.mark.slow
def test_inpaint_with_alpha_and_grey_masks_equal_generate(served, pipe):
    server, _ = served
    want = alone(pipe, source(), strength=0.9, speedup="7x", mask_image=grey_mask())
    for mask in (alpha_mask(), grey_mask()):
        r = edit(server, {"strength": "0.9", "speedup": "7x", "steps": None},
                 [("image", ("in.png", png(source()), "image/png")), ("mask", ("m.png", png(mask), "image/png"))])
        assert_close(pngs(r), want)
