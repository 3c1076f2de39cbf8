"""``POST /v1/images/edits`` (ralu_runtime.serving.edits) on a real server (127.0.0.1, a free port, stopped by the
fixtures) over a tiny random FLUX: img2img and inpainting equal ``generate`` alone (also packed with a generation
request), the official ``openai`` client's ``images.edit`` works unchanged, and every bad upload gets a 400 (413
over the upload limit) in the OpenAI shape with no engine work."""
import functools
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
from helpers import SERVE_DEFAULTS, running_server

T = 120
DEFAULTS = SERVE_DEFAULTS
KEY = "edits-test-key-0123456789"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("tiny-flux")


running = functools.partial(running_server, grace_s=5.0, stop_s=35.0)  # (server, engine) over a tiny engine


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


def test_inpaint_with_alpha_and_grey_masks_equal_generate(served, pipe):
    server, _ = served
    want = alone(pipe, source(), strength=0.9, speedup="7x", mask_image=grey_mask())
    for mask in (alpha_mask(), grey_mask()):
        r = edit(server, {"strength": "0.9", "speedup": "7x", "steps": None},
                 [("image", ("in.png", png(source()), "image/png")), ("mask", ("m.png", png(mask), "image/png"))])
        assert_close(pngs(r), want)


def test_edit_packed_with_a_generation_equals_each_alone(pipe):
    """Both requests reach the engine together (a barrier on its submit), so the edit's VAE encode overlaps the
    generation's first call and the gather window (2 s) packs them: not a race against the machine's load."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    with running(pipe, EngineConfig(gather_timeout_s=2.0)) as (server, engine):
        both, submit = threading.Barrier(2, timeout=60), engine.submit

        def submit_together(*a, **kw):
            both.wait()
            return submit(*a, **kw)

        engine.submit = submit_together  # the test's own engine: the server looks it up per request
        gen = {"prompt": "a castle", "seed": 5, "speedup": "none", "steps": 3}
        with ThreadPoolExecutor(2) as pool:
            e = pool.submit(edit, server)
            g = pool.submit(httpx.post, server.url + GENERATIONS_PATH, json=gen, timeout=T)
            e, g = e.result(), g.result()
        assert engine.metrics()["packed_calls"] >= 1
    assert_close(pngs(e), alone(pipe, source(), strength=0.6, num_inference_steps=3, speedup=None))
    want = generate(pipe, "a castle", seed=5, speedup=None, num_inference_steps=3, output_type="pil",
                    progress=False, **DEFAULTS).images
    assert_close(pngs(g), [np.asarray(im.convert("RGB")).astype(np.int16) for im in want])


def test_size_n_and_output_format(served, pipe):
    server, _ = served
    r = edit(server, {"size": "96x64", "n": "2", "output_format": "jpeg", "output_compression": "90",
                      "response_format": "b64_json", "model": "tiny-flux", "input_fidelity": "low"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_format"] == "jpeg" and len(body["data"]) == 2 and body["ralu"]["seed"] == 3
    import base64

    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert img.format == "JPEG" and img.size == (96, 64)


def test_modes_converted_to_rgb(served, pipe):
    """P and L sources are converted losslessly; RGBA has its alpha dropped."""
    server, _ = served
    rgb = source()
    pal = rgb.quantize(64)
    for img, want in ((pal, pal.convert("RGB")), (rgb.convert("L"), rgb.convert("L").convert("RGB")),
                      (rgb.convert("RGBA"), rgb)):
        r = edit(server, {"strength": "0.3", "steps": "2"}, [("image", ("in.png", png(img), "image/png"))])
        assert_close(pngs(r), alone(pipe, want, strength=0.3, num_inference_steps=2, speedup=None))


def test_official_openai_client(pipe):
    openai = pytest.importorskip("openai")
    with running(pipe, api_keys=[KEY]) as (server, engine):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=T)
        out = client.images.edit(image=("in.png", png(source()), "image/png"), prompt="a red fox", size="64x64",
                                 mask=("m.png", png(alpha_mask()), "image/png"), n=1, response_format="b64_json",
                                 extra_body={"seed": 3, "strength": 0.6, "speedup": "none", "steps": 3})
        assert len(out.data) == 1 and out.data[0].b64_json
        one = client.images.edit(image=[("in.png", png(source()), "image/png")], prompt="a red fox",    # image[]
                                 extra_body={"seed": 3, "strength": 0.6, "speedup": "none", "steps": 3})
        assert len(one.data) == 1
        several = [("a.png", png(source()), "image/png"), ("b.png", png(source(seed=1)), "image/png")]
        with pytest.raises(openai.BadRequestError) as err:       # image[] twice: more than the model takes
            client.images.edit(image=several, prompt="x")
        assert err.value.body["code"] == "too_many_images"
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key-0123456789", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.images.edit(image=("in.png", png(source()), "image/png"), prompt="x")
    import base64

    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).convert("RGB")).astype(np.int16)
    assert_close([got], alone(pipe, source(), strength=0.6, num_inference_steps=3, speedup=None,
                              mask_image=grey_mask()))


# ----------------------------------------------------------------------------------------------- bad uploads
def _bomb() -> bytes:
    """A 4000x4000 PNG of a few KB (decodes to 48 MB)."""
    return png(Image.new("RGB", (4000, 4000)))


def _truncated() -> bytes:
    data = png(source())
    return data[: len(data) // 2]


def _cmyk() -> bytes:
    return png(source().convert("CMYK"), "JPEG")


def _img(data, name="in.png"):
    return ("image", (name, data, "image/png"))


def _mask(img):
    return ("mask", ("m.png", png(img), "image/png"))


BAD = {
    "not_an_image": ([_img(b"hello, this is text")], 400, "image", "invalid_image"),
    "empty_file": ([_img(b"")], 400, "image", "invalid_image"),
    "truncated": ([_img(_truncated())], 400, "image", "invalid_image"),
    "decompression_bomb": ([_img(_bomb())], 400, "image", "image_too_large"),
    "cmyk": ([_img(_cmyk(), "in.jpg")], 400, "image", "invalid_image"),
    "grey_16_bit": ([_img(png(Image.new("I;16", (64, 64), 300)))], 400, "image", "invalid_image"),
    "gif": ([_img(png(source(), "GIF"), "in.gif")], 400, "image", "invalid_image"),
    "two_images": ([_img(png(source())), _img(png(source()))], 400, "image", "too_many_images"),
    "image_brackets_twice": ([("image[]", ("a.png", png(source()), "image/png")),
                              ("image[]", ("b.png", png(source()), "image/png"))], 400, "image", "too_many_images"),
    "no_image": ([], 400, "image", "missing_required_parameter"),
    "mask_other_size": ([_img(png(source())), _mask(grey_mask(32, 32, (0, 0, 8, 8)))], 400, "mask", "invalid_mask"),
    "mask_nothing_transparent": ([_img(png(source())), _mask(Image.new("RGBA", (64, 64), (255, 255, 255, 255)))],
                                 400, "mask", "invalid_mask"),
    "mask_all_black": ([_img(png(source())), _mask(Image.new("L", (64, 64), 0))], 400, "mask", "invalid_mask"),
    "mask_not_an_image": ([_img(png(source())), ("mask", ("m.png", b"GIF89a-no", "image/png"))], 400, "mask",
                          "invalid_image"),
    "over_upload_limit": ([_img(b"\0" * (70 * 1024))], 413, None, "request_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_upload_is_refused_with_no_engine_work(served, case):
    server, engine = served
    files, status, param, code = BAD[case]
    before = engine.metrics()
    r = edit(server, files=files) if files else httpx.post(server.url + EDITS_PATH, data={"prompt": "x"},
                                                           files={"unused": ("u", b"u")}, timeout=T)
    if case == "no_image":
        assert_error(r, 400, param="unused", code="invalid_type")    # a file in a field that takes none
        r = httpx.post(server.url + EDITS_PATH, data={"prompt": "x"}, files=[_mask(grey_mask())], timeout=T)
    assert_error(r, status, param=param, code=code)
    after = engine.metrics()
    assert after["model_calls"] == before["model_calls"] and after["requests"] == before["requests"]
    assert after["queue_depth"] == 0 and after["active"] == 0


def _form(fields: dict, files: list) -> tuple[bytes, dict]:
    """A multipart body and its headers, as httpx writes them."""
    req = httpx.Request("POST", "http://127.0.0.1/", data=fields, files=files)
    return req.read(), {"content-type": req.headers["content-type"]}


@pytest.mark.parametrize("cut", ["closing_boundary", "inside_last_part"])
def test_form_cut_short_is_refused_not_run_without_its_last_part(served, cut):
    """A body whose closing ``--BOUNDARY--`` is missing (sent with a matching Content-Length) is 400 ``invalid_form``;
    the multipart parser alone would drop the unfinished last part (here the mask: an img2img would run)."""
    server, engine = served
    body, headers = _form({"prompt": "a red fox", "seed": "3", "steps": "2", "speedup": "none"},
                          [_img(png(source())), _mask(grey_mask())])
    end = body.rindex(b"--" + headers["content-type"].split("boundary=")[1].encode() + b"--")
    cut_body = body[:end] if cut == "closing_boundary" else body[:end - 40]
    before = engine.metrics()
    r = httpx.post(server.url + EDITS_PATH, content=cut_body, headers=headers, timeout=T)
    assert_error(r, 400, code="invalid_form")
    assert "closing boundary" in r.json()["error"]["message"]
    assert engine.metrics()["requests"] == before["requests"]
    r = httpx.post(server.url + EDITS_PATH, content=body, headers=headers, timeout=T)   # the whole form runs
    assert r.status_code == 200, r.text


def test_form_text_that_is_not_utf8_is_refused(served):
    """A text field with bytes that are not UTF-8 is 400 ``invalid_form`` (the parser decoded them as latin-1 and ran
    the request with that prompt); valid UTF-8 beyond ASCII is taken."""
    server, engine = served
    body, headers = _form({"prompt": "PROMPT_HERE", "seed": "3", "steps": "2", "speedup": "none"},
                          [_img(png(source()))])
    before = engine.metrics()
    r = httpx.post(server.url + EDITS_PATH, content=body.replace(b"PROMPT_HERE", b"a fox \xff\xfe"), headers=headers,
                   timeout=T)
    err = assert_error(r, 400, code="invalid_form")
    assert "'prompt' is not valid utf-8 text" in err["message"]
    assert engine.metrics()["requests"] == before["requests"]
    ok = httpx.post(server.url + EDITS_PATH, content=body.replace(b"PROMPT_HERE", "a fox, caf\u00e9".encode()),
                    headers=headers, timeout=T)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("fields,param,code", [
    ({"bogus": "1"}, "bogus", "unknown_parameter"),
    ({"stream": "true"}, "stream", "unknown_parameter"),
    ({"n": "two"}, "n", "invalid_type"),
    ({"n": "\u0662"}, "n", "invalid_type"),           # ARABIC-INDIC DIGIT TWO: ASCII digits only
    ({"seed": "\uff13"}, "seed", "invalid_type"),      # FULLWIDTH DIGIT THREE
    ({"strength": "nan"}, "strength", "invalid_type"),
    ({"guidance_scale": "1_0"}, "guidance_scale", "invalid_type"),   # Python's float() reads 10
    ({"guidance_scale": "\u0661\u0660"}, "guidance_scale", "invalid_type"),   # Arabic-Indic "10": float() reads 10
    ({"strength": " 0.5"}, "strength", "invalid_type"),
    ({"strength": "0_5"}, "strength", "invalid_type"),
    ({"n": "+1"}, "n", "invalid_type"),
    ({"seed": " 3"}, "seed", "invalid_type"),
    ({"strength": "1.5"}, "strength", "invalid_value"),
    ({"strength": "0"}, "strength", "invalid_value"),
    ({"response_format": "url"}, "response_format", "invalid_value"),
    ({"size": "big"}, "size", "invalid_value"),
    ({"prompt": None}, "prompt", "missing_required_parameter"),
])
def test_bad_fields_are_refused(served, fields, param, code):
    server, engine = served
    before = engine.metrics()["model_calls"]
    assert_error(edit(server, fields), 400, param=param, code=code)
    assert engine.metrics()["model_calls"] == before


def test_strength_range_says_that_zero_is_excluded(served):
    server, _ = served
    for text in ("1.5", "0", "0.0"):
        r = edit(server, {"strength": text})
        assert r.status_code == 400 and "need a value in (0.0, 1.0]" in r.json()["error"]["message"], r.text


def test_body_types_and_access(pipe):
    with running(pipe, api_keys=[KEY]) as (server, engine):
        auth = {"Authorization": f"Bearer {KEY}"}
        assert_error(edit(server), 401, code="invalid_api_key")
        r = httpx.post(server.url + EDITS_PATH, json={"prompt": "x"}, headers=auth, timeout=T)
        assert_error(r, 415, code="unsupported_media_type")       # the edits endpoint takes forms only
        r = httpx.post(server.url + GENERATIONS_PATH, data={"prompt": "x"}, files=[_img(png(source()))],
                       headers=auth, timeout=T)
        assert_error(r, 415, code="unsupported_media_type")       # ... and generations JSON only
        r = httpx.post(server.url + EDITS_PATH + "/", data={"prompt": "x"}, files=[_img(png(source()))],
                       headers=auth, timeout=T)
        assert_error(r, 404, code="not_found")   # was 415 "send application/json", then a 307 to EDITS_PATH
        r = edit(server, headers={**auth, "Host": "evil.example"})
        assert r.status_code == 421
        r = edit(server, headers={**auth, "Origin": "https://evil.example"})
        assert_error(r, 403, code="origin_not_allowed")
        assert engine.metrics()["model_calls"] == 0
        assert edit(server, {"steps": "2"}, headers=auth).status_code == 200


def test_model_without_editing_is_refused():
    pipe = build_tiny("tiny-flux2-klein")
    engine = Engine(pipe, EngineConfig(), **DEFAULTS)
    try:
        with Server(create_app(engine, model_name="k"), "127.0.0.1", 0, grace_s=5) as server:
            err = assert_error(edit(server), 400, code="unsupported_model")
            assert "(flux2-klein) takes no image" in err["message"] and "sd3, chroma" in err["message"]
            assert engine.metrics()["model_calls"] == 0
    finally:
        engine.shutdown(drain=False, timeout=30)


def _png_header(w: int, h: int) -> bytes:
    """A PNG of ``w`` x ``h`` pixels by its header (no pixel data): what a decompression bomb shows before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(5000, 4000), (100000, 100000)])
def test_decode_refuses_too_many_pixels_before_decoding(w, h):
    """Over the default limit (16.8 MP: ralu's check from the header) and over Pillow's own (at open)."""
    from ralu_runtime.serving.edits import MAX_UPLOAD_PIXELS, decode_image
    from ralu_runtime.serving.protocol import ApiError

    assert w * h > MAX_UPLOAD_PIXELS
    with pytest.raises(ApiError) as err:
        decode_image(_png_header(w, h), "image")
    assert err.value.status == 400 and err.value.code == "image_too_large"


def test_streamed_upload_over_the_limit_is_413(served):
    """No Content-Length (chunked): the limit is applied while the body streams in."""
    server, engine = served
    boundary = "ralu-test-boundary"
    head = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "content-type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(80):
            yield b"\0" * 1024

    before = engine.metrics()
    r = httpx.post(server.url + EDITS_PATH, content=body(), timeout=T,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_error(r, 413, code="request_too_large")
    assert engine.metrics()["requests"] == before["requests"]


def test_sd3_img2img_equals_generate():
    pipe = build_tiny("tiny-sd3")
    with running(pipe) as (server, engine):
        got = pngs(edit(server, {"strength": "0.5", "guidance_scale": "2.0"}))
    want = alone(pipe, source(), strength=0.5, num_inference_steps=3, speedup=None, guidance_scale=2.0)
    assert_close(got, want)


def test_jpeg_exif_orientation_is_applied(served, pipe):
    """A JPEG with EXIF orientation 6 is edited upright (as viewers show it), as generate gets it transposed."""
    from PIL import ImageOps

    server, _ = served
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    source(64, 32).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    assert upright.size == (32, 64)
    r = edit(server, {"strength": "0.3", "steps": "2"}, [("image", ("in.jpg", buf.getvalue(), "image/jpeg"))])
    assert_close(pngs(r), alone(pipe, upright, strength=0.3, num_inference_steps=2, speedup=None))
    sideways = alone(pipe, Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), strength=0.3,
                     num_inference_steps=2, speedup=None)
    assert np.abs(pngs(r)[0] - sideways[0]).max() > 1
