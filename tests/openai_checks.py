"""Checks of OpenAI-shaped image responses shared by the HTTP and Ray Serve tests: decoded PNGs and error bodies."""
import base64
import io

import numpy as np
from PIL import Image

ERROR_KEYS = {"message", "type", "param", "code"}


def pngs(resp) -> list[np.ndarray]:
    """The response's images as int16 RGB arrays (asserts a 200 with PNG payloads)."""
    assert resp.status_code == 200, resp.text
    out = []
    for item in resp.json()["data"]:
        img = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert img.format == "PNG"
        out.append(np.asarray(img.convert("RGB")).astype(np.int16))
    return out


def assert_error(resp, status, param=None, code=None):
    """Asserts the OpenAI error shape with ``status`` (and ``param`` / ``code`` when given); returns the error."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == ERROR_KEYS and err["message"] and "Traceback" not in err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err
