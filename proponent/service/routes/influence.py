"""Influence queries: an uploaded image / array, or a stored training sample."""

from __future__ import annotations

import io
import json
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from proponent.build.data import DataError, load_image_bytes
from proponent.client.schemas import InfluenceParams, InfluenceResponse
from proponent.model.objectives import Objective
from proponent.query.crossloss import ObjectiveError, make_query_objective
from proponent.query.index import Direction, InfluenceIndex
from proponent.service.deps import EngineDep, IndexDep, StateDep
from proponent.service.errors import ApiError, error_responses
from proponent.service.state import ServiceState

router = APIRouter(tags=["influence"])

_NPY_MAGIC = b"\x93NUMPY"
_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)
_RAW_TYPES = ("application/octet-stream", "application/x-npy", "application/npy")

_PARAMS_DOC = InfluenceParams.model_json_schema()
_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "additionalProperties": False,
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "PNG/JPEG/... (anything Pillow reads) or .npy"},
        **{
            k: (
                {"type": "string", "description": "JSON list or comma-separated, e.g. 0,2,4"}
                if k == "checkpoints"
                else v
            )
            for k, v in _PARAMS_DOC["properties"].items()
        },
    },
}
_JSON_SCHEMA = {
    "type": "object",
    "required": ["x"],
    "additionalProperties": False,
    "properties": {
        "x": {
            "description": "nested list of numbers with the index's input shape (e.g. [1, 8, 8])",
            "type": "array",
            "items": {},
        },
        **_PARAMS_DOC["properties"],
    },
}
_UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
            "application/json": {"schema": _JSON_SCHEMA},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_SAMPLE_OPENAPI = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": _PARAMS_DOC}}},
}


# ---------------------------------------------------------------------------------- parsing
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _parse_params(raw: dict[str, Any]) -> InfluenceParams:
    try:
        return InfluenceParams.model_validate(raw)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in e.errors()]
        raise ApiError(422, "; ".join(msgs)) from None


def _form_value(key: str, value: str) -> Any:
    v = value.strip()
    if key == "checkpoints":
        if v.startswith("["):
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                raise ApiError(422, f"checkpoints: not a JSON list: {v!r}") from None
        try:
            return [int(s) for s in v.split(",") if s.strip()]
        except ValueError:
            raise ApiError(422, f"checkpoints: expected a JSON list or comma-separated integers, got {v!r}") from None
    return v


def sniff(data: bytes) -> str:
    """``npy`` or ``image`` by magic bytes (Pillow's own detection as fallback); 415 otherwise."""
    if not data:
        raise ApiError(422, "the uploaded file is empty")
    if data[:6] == _NPY_MAGIC:
        return "npy"
    if any(data.startswith(m) for m in _IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "image"
    try:
        with Image.open(io.BytesIO(data)):
            return "image"
    except (UnidentifiedImageError, Exception):
        head = data[:8].hex(" ")
        raise ApiError(
            415, f"unsupported upload: neither an image Pillow can read nor a .npy array (first bytes: {head})"
        ) from None


def decode_upload(data: bytes, index: InfluenceIndex, allow_resize: bool, max_pixels: int) -> np.ndarray:
    sniff(data)
    try:
        return load_image_bytes(data, index.shape, allow_resize=allow_resize, max_pixels=max_pixels)
    except DataError as e:
        msg = str(e)
        if "more than the limit" in msg:
            raise ApiError(413, msg) from None
        raise ApiError(422, f"{msg} (the index's input shape is {list(index.shape)})") from None


def decode_json_array(x: Any, index: InfluenceIndex, allow_resize: bool = False, max_pixels: int = 0) -> np.ndarray:
    """The JSON ``x``: the index's input shape exactly (a leading batch axis of 1 allowed), values in [0, 1];
    with ``allow_resize`` another H x W (or layout) is converted like an uploaded .npy array."""
    try:
        with np.errstate(over="ignore"):  # numbers beyond float32 become inf: refused just below
            a = np.asarray(x, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise ApiError(422, "x must be a (rectangular) nested list of numbers") from None
    if not np.isfinite(a).all():
        raise ApiError(422, "x contains NaN or infinite values (or numbers too large for float32)")
    if a.shape[:1] == (1,) and a.shape[1:] == index.shape:
        a = a[0]
    if a.shape != index.shape:
        if not allow_resize or a.size == 0:
            raise ApiError(
                422,
                f"x has shape {list(a.shape)}, expected the index's input shape {list(index.shape)}"
                + ("" if allow_resize else " (allow_resize=true resizes another height x width)"),
            )
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        try:
            return load_image_bytes(buf.getvalue(), index.shape, allow_resize=True, max_pixels=max_pixels)
        except DataError as e:
            msg = str(e).removeprefix("npy: ")
            status = 413 if "more than the limit" in msg else 422
            raise ApiError(status, f"x: {msg} (the index's input shape is {list(index.shape)})") from None
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ApiError(422, f"x: values must lie in [0, 1], got min {a.min():g}, max {a.max():g}")
    return a


async def read_query(
    request: Request, index: InfluenceIndex, state: ServiceState
) -> tuple[np.ndarray, InfluenceParams]:
    """The query image and parameters from a multipart, JSON or raw request (body size already bounded)."""
    media = _media_type(request)
    s = state.settings
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=32)
        except StarletteHTTPException as e:  # malformed multipart, too many parts: 422 like malformed JSON
            raise ApiError(422, f"multipart body: {e.detail}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "multipart body needs a 'file' part holding the image or .npy array")
        data = await upload.read()
        raw = {k: _form_value(k, v) for k, v in form.items() if k != "file" and isinstance(v, str)}
        params = _parse_params(raw)
        x = await run_in_threadpool(decode_upload, data, index, params.allow_resize, s.max_image_pixels)
        await form.close()
        return x, params
    if media == "application/json":
        body = await request.body()
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(422, f"body is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or "x" not in obj:
            raise ApiError(422, 'JSON body must be an object with the query array "x" and optional parameters')
        x_raw = obj.pop("x")
        params = _parse_params(obj)
        x = await run_in_threadpool(decode_json_array, x_raw, index, params.allow_resize, s.max_image_pixels)
        return x, params
    if media in _RAW_TYPES or media.startswith("image/"):
        data = await request.body()
        params = _parse_params({k: _form_value(k, v) for k, v in request.query_params.items()})
        x = await run_in_threadpool(decode_upload, data, index, params.allow_resize, s.max_image_pixels)
        return x, params
    raise ApiError(
        415,
        f"unsupported content type {media or '(none)'!r}: send multipart/form-data with a 'file' part, "
        'application/json with "x", or the raw image / .npy bytes',
    )


# ---------------------------------------------------------------------------------- computing
def check_params(params: InfluenceParams, index: InfluenceIndex, max_k: int) -> tuple[list[int], Objective]:
    if params.k > max_k:
        raise ApiError(422, f"k: must be between 1 and {max_k}, got {params.k}")
    try:
        cks = index.resolve_checkpoints(params.checkpoints)
    except ValueError as e:
        raise ApiError(422, f"checkpoints: {e}") from None
    try:
        obj = make_query_objective(index, params.objective, beta=params.beta, label=params.label)
    except ObjectiveError as e:
        raise ApiError(422, f"objective: {e}") from None
    return cks, obj


def compute(
    state: ServiceState,
    params: InfluenceParams,
    cks: list[int],
    objective: Objective,
    *,
    x: np.ndarray | None = None,
    row: int | None = None,
) -> dict[str, Any]:
    """Featurize (or read stored features) and run the certified search; runs on a worker thread."""
    index = state.index
    assert index is not None
    t0 = time.perf_counter()
    if row is not None and params.objective == "elbo":
        q = index.stored_features(row, cks)
    else:
        if x is None:
            assert row is not None
            x = index.image(row)
        label = params.label
        if label is None and row is not None and index.labels[row] >= 0:
            label = int(index.labels[row])
        labels = None if label is None else np.array([label], np.int64)
        feats = index.featurize(x[None], objective=objective, seed=params.seed, labels=labels, checkpoints=cks)
        q = {c: v[0] for c, v in feats.items()}
    candidates = None
    if params.prefilter:
        if row is not None:
            assert index.latent_mu is not None
            mu = index.latent_mu[row]
        else:
            assert x is not None
            mu = index.latent_means(x[None])[0]
        candidates = index.latent_neighbours(mu, params.prefilter)
    t1 = time.perf_counter()
    directions: list[Direction] = ["proponents", "opponents"] if params.direction == "both" else [params.direction]
    out: dict[str, Any] = {"search": {}, "exact": True}
    for d in directions:
        res = index.top(
            q,
            params.k,
            d,
            params.convention,
            cks,
            strategy=params.search,
            candidates=candidates,
        )
        out[d] = [
            {**state.hit_meta(int(r)), "score": float(s), "contributions": [float(v) for v in contrib]}
            for r, s, contrib in zip(res.rows, res.scores, res.contributions, strict=True)
        ]
        assert res.search is not None
        out["search"][d] = {
            "strategy": res.search.strategy,
            "rounds": res.search.rounds,
            "candidates": res.search.candidates,
            "depth": res.search.depth,
            "full_scan": res.search.full_scan,
        }
        state.metrics.rounds.observe(res.search.rounds)
        out["exact"] = out["exact"] and res.exact
    t2 = time.perf_counter()
    out["featurize_ms"] = (t1 - t0) * 1e3
    out["search_ms"] = (t2 - t1) * 1e3
    return out


def _response(
    out: dict[str, Any],
    params: InfluenceParams,
    cks: list[int],
    index: InfluenceIndex,
    decode_ms: float,
    t0: float,
    sample_id: int | None = None,
) -> dict[str, Any]:
    return {
        "query": {
            "seed": params.seed,
            "objective": params.objective,
            "convention": params.convention,
            "checkpoints": cks,
            "shape": list(index.shape),
            "sample_id": sample_id,
        },
        "proponents": out.get("proponents"),
        "opponents": out.get("opponents"),
        "exact": out["exact"],
        "approximations": index.approximations(cks, params.prefilter),
        "search": out["search"],
        "timings": {
            "decode_ms": decode_ms,
            "featurize_ms": out["featurize_ms"],
            "search_ms": out["search_ms"],
            "total_ms": (time.perf_counter() - t0) * 1e3,
        },
    }


def _map_value_errors(e: ValueError) -> ApiError:
    return ApiError(422, str(e))


@router.post(
    "/influence",
    response_model=InfluenceResponse,
    openapi_extra=_UPLOAD_OPENAPI,
    responses=error_responses(401, 413, 415, 422, 503, 504),
    summary="Proponents / opponents of an uploaded image or array",
)
async def influence(request: Request, index: IndexDep, engine: EngineDep, state: StateDep) -> Any:
    t0 = time.perf_counter()
    x, params = await read_query(request, index, state)
    decode_ms = (time.perf_counter() - t0) * 1e3
    cks, obj = check_params(params, index, state.settings.max_k)
    try:
        out = await engine.run(lambda: compute(state, params, cks, obj, x=x))
    except ValueError as e:
        raise _map_value_errors(e) from None
    return _response(out, params, cks, index, decode_ms, t0)


@router.post(
    "/influence/samples/{sample_id}",
    response_model=InfluenceResponse,
    openapi_extra=_SAMPLE_OPENAPI,
    responses=error_responses(401, 404, 415, 422, 503, 504),
    summary="Proponents / opponents of a stored training sample",
)
async def influence_of_sample(
    request: Request,
    sample_id: Annotated[int, Path(ge=0, description="training sample id")],
    index: IndexDep,
    engine: EngineDep,
    state: StateDep,
) -> Any:
    t0 = time.perf_counter()
    body = await request.body()
    raw: dict[str, Any] = {}
    if body.strip():
        if _media_type(request) not in ("application/json", ""):
            raise ApiError(415, f"unsupported content type {_media_type(request)!r}: the optional body is JSON")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(422, f"body is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ApiError(422, "JSON body must be an object of query parameters")
    params = _parse_params(raw)
    try:
        row = index.row_of(sample_id)
    except KeyError as e:
        raise ApiError(404, str(e.args[0])) from None
    cks, obj = check_params(params, index, state.settings.max_k)
    try:
        out = await engine.run(lambda: compute(state, params, cks, obj, row=row))
    except ValueError as e:
        raise _map_value_errors(e) from None
    return _response(out, params, cks, index, 0.0, t0, sample_id=sample_id)


__all__ = ["router", "sniff", "decode_upload"]
