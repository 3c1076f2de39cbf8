"""``POST /v1/images/edits`` as OpenAI defines it (multipart/form-data), for ``ralu serve``.

The form is read within a byte limit (413 beyond), parsed (``image`` or ``image[]``: the source image, ``mask``
optional, the other fields as text), every upload is decoded and checked here (400 for anything the pipeline
cannot take: not an image, truncated, too many pixels, an unsupported mode, a mask of another size or with no pixel
to repaint, more images than the model takes), and the text fields go through
:func:`~ralu_runtime.serving.protocol.parse_request` with :data:`EDIT_FIELDS`. Nothing reaches the engine before
all of that passed. The result is ``generate`` keyword arguments with ``image=`` (PIL RGB), ``strength=`` and
``mask_image=`` (PIL "L", 255 = repaint). Conventions (docs/serving.md, "Image edits"):

* accepted files: PNG, JPEG, WebP (Pillow's decoders for those only); EXIF orientation is applied;
* image modes RGB, RGBA, RGBX, P, PA, L, LA and 1 are converted to RGB (alpha dropped); others (CMYK, 16-bit or
  float grey, YCbCr, LAB, ...) are refused: convert them to RGB first;
* mask: with an alpha channel (RGBA, LA, PA, P with transparency) the fully transparent pixels (alpha 0) are
  repainted (OpenAI's rule); without one (L, 1, RGB) the pixels of grey level 128 or more (white) are repainted.
"""
from __future__ import annotations

import io
import math
import re

from PIL import Image, ImageOps
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from ..editing import EDIT_FAMILIES
from .protocol import EDITS_PATH, REQUEST_FIELDS, ApiError, parse_request, read_bytes

__all__ = ["EDITS_PATH", "EDIT_FIELDS", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "MAX_INPUT_IMAGES",
           "IMAGE_FORMATS", "RGB_MODES", "check_family", "read_raw", "parse_form", "parse_edit", "decode_image",
           "image_rgb", "mask_of", "channel_model"]

MAX_UPLOAD_BYTES = 16 << 20          # a whole edit request (images, mask and fields)
MAX_UPLOAD_PIXELS = 4096 * 4096      # per uploaded image, checked from its header before it is decoded
MAX_INPUT_IMAGES = 1                 # source images the served pipelines take (img2img / inpainting: one)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
RGB_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "L", "LA", "1")
_ALPHA_MODES = ("RGBA", "LA", "PA")
# the edit form's fields: the generation fields, ralu's strength, OpenAI's input_fidelity (accepted, ignored)
EDIT_FIELDS = {**REQUEST_FIELDS, "strength": ("number", "strength"), "input_fidelity": ("string", None)}
_FILE_FIELDS = ("image", "image[]", "mask")
# form numbers as JSON writes them (ASCII digits, a '-' sign, a decimal point, an exponent): Python's int() / float()
# would also take '1_0' (10), other scripts' digits, a '+' sign and surrounding white space
_INT = re.compile(r"-?[0-9]{1,30}", re.ASCII)
_NUMBER = re.compile(r"-?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)


def channel_model(adapter) -> str | None:
    """"control" / "fill" when the served pipeline is a ``FluxControlPipeline`` / ``FluxFillPipeline``: every
    request needs an upload (the control image; the image and its mask), so only the edits endpoint serves it."""
    from ..channel_cond import channel_kind

    pipe = getattr(adapter, "pipe", None)
    return None if pipe is None else channel_kind(pipe)


def check_family(adapter) -> None:
    """400 naming the supported families when the served model cannot edit."""
    if adapter.family not in EDIT_FAMILIES:
        raise ApiError(400, f"the served model ({adapter.family}) takes no image: /v1/images/edits works with "
                            f"the models of the families {', '.join(EDIT_FAMILIES)} only", code="unsupported_model")


async def read_raw(request, max_bytes: int) -> bytes:
    """The upload's bytes; 413 over ``max_bytes`` (by Content-Length or while streaming)."""
    return await read_bytes(request, max_bytes, limit="upload limit", what="upload")


class _StrictTextParser(MultiPartParser):
    """Starlette's multipart parser, except that a text field that is not valid text in the form's charset (UTF-8
    unless the Content-Type names another) is an error, not decoded as latin-1 (JSON bodies refuse such text too)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"the text field {part.field_name[:60]!r} is not valid "
                                         f"{self._charset or 'utf-8'} text") from None
        super().on_part_end()


async def parse_form(headers, raw: bytes) -> tuple[dict, dict]:
    """A multipart body -> ``(text fields, files)``: ``{name: str}`` and ``{name: [bytes, ...]}`` ("image[]" is
    "image"); 400 for a malformed body, a repeated text field, text where a file belongs or a file elsewhere."""
    from starlette import formparsers

    if formparsers.multipart is None:
        raise ApiError(500, "image uploads need python-multipart, which is not installed on the server: pip install "
                            "-e '.[serve]'", code="internal_error")

    async def stream():
        yield raw
        yield b""

    # the parser takes a body that ends early (no closing delimiter) and drops its unfinished last part: a form
    # cut short in transit (e.g. without its mask) must not run as a different request
    _, options = parse_options_header(headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if boundary and b"--" + boundary + b"--" not in raw:
        raise ApiError(400, "the request body is not a complete multipart form: its closing boundary "
                            "(--BOUNDARY--) is missing, so the body was cut short", code="invalid_form")
    parser = _StrictTextParser(Headers(raw=list(headers.raw)), stream(), max_files=8, max_fields=64,
                             max_part_size=256 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the request body is not a valid multipart form: {exc.message}",
                       code="invalid_form") from None
    fields, files = {}, {}
    try:
        for name, value in form.multi_items():
            if name in _FILE_FIELDS:
                if not isinstance(value, UploadFile):
                    raise ApiError(400, f"{name} must be a file upload (multipart part with a filename), not text",
                                   param=name.rstrip("[]"), code="invalid_type")
                files.setdefault(name.rstrip("[]"), []).append(await value.read())
            elif isinstance(value, UploadFile):
                raise ApiError(400, f"{name[:60]!r} is a file upload; only image, image[] and mask take files",
                               param=name[:60], code="invalid_type")
            elif name in fields:
                raise ApiError(400, f"field {name[:60]!r} is given twice", param=name[:60], code="invalid_value")
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files


def _typed(name: str, text: str):
    """A form field's text as the JSON type the field takes (ints and numbers parsed; 400 when they do not)."""
    kind = EDIT_FIELDS.get(name, ("string", None))[0]
    if kind == "integer":
        if not _INT.fullmatch(text):
            raise ApiError(400, f"{name}={text[:60]!r} is not allowed: need an integer (ASCII digits, optionally "
                           "after '-')", param=name, code="invalid_type")
        return int(text)
    if kind == "number":
        value = float(text) if _NUMBER.fullmatch(text) else math.nan
        if not math.isfinite(value):
            raise ApiError(400, f"{name}={text[:60]!r} is not allowed: need a finite decimal number (ASCII digits, "
                           "'-', '.', an exponent: 7.5, 0.6, 1e-3)", param=name, code="invalid_type")
        return value
    return text


def decode_image(data: bytes, param: str, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """An uploaded file -> a loaded PIL image (EXIF orientation applied); 400 when it is not a PNG / JPEG / WebP
    image, is truncated or corrupt, or has more than ``max_pixels`` pixels (checked before decoding)."""
    if not data:
        raise ApiError(400, f"{param} is an empty file", param=param, code="invalid_image")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)   # reads the header only
        w, h = img.size
        if w * h > max_pixels:
            raise ApiError(400, f"{param} is {w}x{h} pixels, over the limit of {max_pixels} pixels per image",
                           param=param, code="image_too_large")
        img.load()
        img = ImageOps.exif_transpose(img)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:     # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), at open
        raise ApiError(400, f"{param}: {exc}", param=param, code="image_too_large") from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, f"{param} is not an image ralu reads: upload a PNG, JPEG or WebP file",
                       param=param, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ApiError(400, f"{param} could not be decoded (truncated or corrupt file): "
                            f"{' '.join(str(exc).split())[:200]}", param=param, code="invalid_image") from None
    return img


def image_rgb(img: Image.Image, param: str = "image") -> Image.Image:
    """The source image as RGB: :data:`RGB_MODES` are converted (alpha dropped), other modes refused (400)."""
    if img.mode not in RGB_MODES:
        raise ApiError(400, f"{param} has mode {img.mode}, which ralu does not convert (it takes "
                            f"{', '.join(RGB_MODES)}): save it as 8-bit RGB", param=param, code="invalid_image")
    return img if img.mode == "RGB" else img.convert("RGB")


def mask_of(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask upload -> PIL "L" with 255 where to repaint and 0 elsewhere. With alpha: alpha 0 is repainted
    (OpenAI's rule); without: grey >= 128 is repainted. 400 for another size than the image, an unsupported mode
    or no pixel to repaint."""
    if img.size != size:
        raise ApiError(400, f"the mask is {img.size[0]}x{img.size[1]}, the image {size[0]}x{size[1]}: they must "
                            "have the same size", param="mask", code="invalid_mask")
    if img.mode not in RGB_MODES:
        raise ApiError(400, f"mask has mode {img.mode}: use a PNG with alpha (transparent = repaint) or a grey "
                            "one (white = repaint)", param="mask", code="invalid_mask")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        mask = img.getchannel("A").point(lambda a: 255 if a == 0 else 0)
        rule = "no fully transparent pixel (alpha 0 marks where to edit; for a white = repaint mask send one " \
               "without alpha)"
    else:
        mask = img.convert("L").point(lambda v: 255 if v >= 128 else 0)
        rule = "no white pixel (white marks where to edit in a mask without alpha)"
    if mask.getbbox() is None:
        raise ApiError(400, f"the mask has {rule}: nothing to repaint", param="mask", code="invalid_mask")
    return mask


def parse_edit(fields: dict, files: dict, *, model_name: str, max_images: int, default_deadline_s,
               max_pixels: int = MAX_UPLOAD_PIXELS, control: bool = False):
    """Form fields and files -> ``(generate kwargs, deadline_s, seed, Encoding)`` with ``image`` / ``mask_image``;
    every upload and field checked (400 / 404 as :func:`parse_request`). ``control``: the served pipeline is a
    ``FluxControlPipeline``: the upload is its ``control_image`` (a Canny or depth map); a mask is refused."""
    images = files.get("image", [])
    if not images:
        raise ApiError(400, "missing required field: image (a file upload)", param="image",
                       code="missing_required_parameter")
    if len(images) > MAX_INPUT_IMAGES:
        raise ApiError(400, f"{len(images)} images were sent; the served model takes {MAX_INPUT_IMAGES} (img2img "
                            "and inpainting edit one source image)", param="image", code="too_many_images")
    if len(files.get("mask", [])) > 1:
        raise ApiError(400, "more than one mask was sent", param="mask", code="invalid_mask")
    body = {}
    for name, text in fields.items():
        body[name] = _typed(name, text) if name in EDIT_FIELDS else text
    kwargs, deadline, seed, encoding = parse_request(body, model_name=model_name, max_images=max_images,
                                                     default_deadline_s=default_deadline_s, fields=EDIT_FIELDS)
    source = decode_image(images[0], "image", max_pixels)
    if control:
        if "mask" in files:
            raise ApiError(400, "the served model (FluxControlPipeline) takes no mask: send the control image "
                                "(Canny or depth map) as image", param="mask", code="invalid_mask")
        kwargs["control_image"] = image_rgb(source)
        return kwargs, deadline, seed, encoding
    if "mask" in files:
        kwargs["mask_image"] = mask_of(decode_image(files["mask"][0], "mask", max_pixels), source.size)
    kwargs["image"] = image_rgb(source)
    return kwargs, deadline, seed, encoding
