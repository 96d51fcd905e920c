"""Influence queries: an uploaded image / array, or a stored training sample."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request, Response
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from proponent.api.schemas import BatchInfluenceResponse, BatchTimings, InfluenceParams, InfluenceResponse
from proponent.format.fsio import StorageError
from proponent.format.images import DataError, load_image_bytes
from proponent.format.store import StoreError
from proponent.query.crossloss import ObjectiveError
from proponent.query.index import InfluenceIndex
from proponent.query.searcher import ShardUnavailable
from proponent.query.usecase import answer, answer_batch, npy_bytes, score_vector
from proponent.service.deps import EngineDep, IndexDep, SampleId, StateDep
from proponent.service.engine import QueryEngine
from proponent.service.errors import ApiError, BodyTooLarge, error_responses, validation_message
from proponent.service.state import ServiceState

router = APIRouter(tags=["influence"])
T = TypeVar("T")

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
        raise ApiError(422, validation_message(e)) from None


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


def _all_numbers(x: Any) -> bool:
    """Every leaf of the nested list ``x`` is a JSON number (not a string, boolean or null)."""
    stack = [x]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
    return True


def decode_json_array(x: Any, index: InfluenceIndex, allow_resize: bool = False, max_pixels: int = 0) -> np.ndarray:
    """The JSON ``x``: the index's input shape exactly (a leading batch axis of 1 allowed), values in [0, 1];
    with ``allow_resize`` another H x W (or layout) is converted like an uploaded .npy array."""
    if not _all_numbers(x):
        raise ApiError(422, "x must be a nested list of numbers (found a string, boolean, null or object in it)")
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
        except BodyTooLarge:
            raise  # over the size limit while it streamed in (chunked): 413 at once, the rest never read
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


# ---------------------------------------------------------------------------------- answering
def check_params(params: InfluenceParams, index: InfluenceIndex, max_k: int) -> None:
    """Checks that need the index, answered as 422 before the query is queued."""
    if params.k > max_k:
        raise ApiError(422, f"k: must be between 1 and {max_k}, got {params.k}")
    try:
        index.meta.resolve_checkpoints(params.checkpoints)
    except ValueError as e:
        raise ApiError(422, f"checkpoints: {e}") from None


async def run_query(
    state: ServiceState,
    engine: QueryEngine,
    params: InfluenceParams,
    *,
    x: np.ndarray | None = None,
    sample_id: int | None = None,
    decode_ms: float = 0.0,
) -> InfluenceResponse:
    """The query use case on a worker thread; its errors as API errors."""
    index = state.index
    assert index is not None

    def work() -> InfluenceResponse:
        return answer(index, params, x=x, sample_id=sample_id, decode_ms=decode_ms)

    res = await _on_engine(state, engine, work)
    for d in ("proponents", "opponents"):
        if d in res.search:
            state.metrics.candidates.observe(res.search[d].candidates)
    return res


async def _on_engine(state: ServiceState, engine: QueryEngine, work: Callable[[], T]) -> T:
    """``work`` (a query use case) on a worker thread; its errors as API errors."""
    if state.damaged:
        raise ApiError(500, state.damaged, code="index_damaged")
    try:
        return await engine.run(work)
    except StoreError as e:
        state.damaged = str(e)
        state.ready = False
        raise ApiError(500, str(e), code="index_damaged") from None
    except StorageError as e:  # the index's storage (object store) failed: transient, not damage
        raise ApiError(503, str(e), code="storage_unavailable", headers={"Retry-After": "5"}) from None
    except ShardUnavailable as e:
        raise ApiError(503, str(e), code="shard_unavailable", headers={"Retry-After": str(e.retry_after_s)}) from None
    except ObjectiveError as e:
        raise ApiError(422, f"objective: {e}") from None
    except KeyError as e:
        raise ApiError(404, str(e.args[0])) from None
    except ValueError as e:
        raise ApiError(422, str(e)) from None


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
    check_params(params, index, state.settings.max_k)
    return await run_query(state, engine, params, x=x, decode_ms=decode_ms)


@router.post(
    "/influence/samples/{sample_id}",
    response_model=InfluenceResponse,
    openapi_extra=_SAMPLE_OPENAPI,
    responses=error_responses(401, 404, 415, 422, 503, 504),
    summary="Proponents / opponents of a stored training sample",
)
async def influence_of_sample(
    request: Request,
    sample_id: SampleId,
    index: IndexDep,
    engine: EngineDep,
    state: StateDep,
) -> Any:
    params = await _sample_params(request, index, sample_id)
    check_params(params, index, state.settings.max_k)
    return await run_query(state, engine, params, sample_id=sample_id)


async def _sample_params(request: Request, index: InfluenceIndex, sample_id: int) -> InfluenceParams:
    """A stored-sample query's parameters: the optional JSON body (POST) or the query string (GET)."""
    raw: dict[str, Any] = {}
    if request.method == "GET":
        raw = {k: _form_value(k, v) for k, v in request.query_params.items()}
    else:
        body = await request.body()
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
        index.row_of(sample_id)
    except KeyError as e:
        raise ApiError(404, str(e.args[0])) from None
    return params


# ---------------------------------------------------------------------------------- full score vectors
_NPY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/x-npy": {"schema": {"type": "string", "format": "binary"}}},
        "description": "a .npy file: N records (id int64, score float64) in row order; the header "
        "X-Proponent-Approximations lists what separates the scores from exact VAE-TracIn (JSON)",
    }
}


async def _scores_response(
    state: ServiceState,
    engine: QueryEngine,
    params: InfluenceParams,
    *,
    x: np.ndarray | None = None,
    sample_id: int | None = None,
) -> Response:
    index = state.index
    assert index is not None
    try:
        index.meta.resolve_checkpoints(params.checkpoints)
    except ValueError as e:
        raise ApiError(422, f"checkpoints: {e}") from None

    def work() -> bytes:
        return npy_bytes(score_vector(index, params, x=x, sample_id=sample_id))

    data = await _on_engine(state, engine, work)
    cks = index.meta.resolve_checkpoints(params.checkpoints)
    approx = json.dumps(index.meta.approximations(cks), ensure_ascii=True)
    return Response(
        data,
        media_type="application/x-npy",
        headers={"Content-Disposition": 'attachment; filename="scores.npy"', "X-Proponent-Approximations": approx},
    )


@router.post(
    "/scores",
    response_class=Response,
    openapi_extra=_UPLOAD_OPENAPI,
    responses={**_NPY_RESPONSE, **error_responses(401, 413, 415, 422, 503, 504)},
    summary="Every training sample's score for an uploaded image or array (.npy)",
)
async def scores(request: Request, index: IndexDep, engine: EngineDep, state: StateDep) -> Response:
    x, params = await read_query(request, index, state)
    return await _scores_response(state, engine, params, x=x)


@router.get(
    "/scores/samples/{sample_id}",
    response_class=Response,
    responses={**_NPY_RESPONSE, **error_responses(401, 404, 422, 503, 504)},
    summary="Every training sample's score for a stored training sample (.npy; parameters in the query string)",
    operation_id="scores_of_sample_get",
)
@router.post(
    "/scores/samples/{sample_id}",
    response_class=Response,
    openapi_extra=_SAMPLE_OPENAPI,
    responses={**_NPY_RESPONSE, **error_responses(401, 404, 415, 422, 503, 504)},
    summary="Every training sample's score for a stored training sample (.npy)",
    operation_id="scores_of_sample_post",
)
async def scores_of_sample(
    request: Request,
    sample_id: SampleId,
    index: IndexDep,
    engine: EngineDep,
    state: StateDep,
) -> Response:
    params = await _sample_params(request, index, sample_id)
    return await _scores_response(state, engine, params, sample_id=sample_id)


_BATCH_JSON_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "xs": {
            "description": "the query arrays: a list of nested lists, each with the index's input shape",
            "type": "array",
            "items": {},
        },
        "sample_ids": {
            "description": "stored training samples to query",
            "type": "array",
            "items": {"type": "integer"},
        },
        **_PARAMS_DOC["properties"],
    },
}
_BATCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _BATCH_JSON_SCHEMA},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary", "description": ".npy array [B, *input shape]"}
            },
        },
    }
}


def decode_npy_batch(data: bytes, index: InfluenceIndex) -> np.ndarray:
    """A .npy array ``[B, *input shape]`` of values in [0, 1] (no pickles)."""
    if data[:6] != _NPY_MAGIC:
        raise ApiError(415, "a batch upload is one .npy array [B, *input shape] (first bytes are not .npy's)")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ApiError(422, f"npy: cannot read the array: {e}") from None
    if a.ndim != len(index.shape) + 1 or tuple(a.shape[1:]) != index.shape:
        raise ApiError(422, f"batch array has shape {list(a.shape)}, expected [B, {', '.join(map(str, index.shape))}]")
    if a.dtype.kind not in "fiu":
        raise ApiError(422, f"batch array has dtype {a.dtype}, expected numbers")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ApiError(422, "batch array contains NaN or infinite values")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ApiError(422, f"batch array: values must lie in [0, 1], got min {a.min():g}, max {a.max():g}")
    return a


@router.post(
    "/influence/batch",
    response_model=BatchInfluenceResponse,
    openapi_extra=_BATCH_OPENAPI,
    responses=error_responses(401, 404, 413, 415, 422, 503, 504),
    summary="Proponents / opponents of many queries at once (uploads or stored samples), one pass over the rows",
)
async def influence_batch(request: Request, index: IndexDep, engine: EngineDep, state: StateDep) -> Any:
    """Each query answered as its single query would be (same parameters for all); the exact scans of the
    batch share one pass over the rows (an int8 GEMM instead of one product per query)."""
    t0 = time.perf_counter()
    media = _media_type(request)
    xs: np.ndarray | list[np.ndarray] | None = None
    sample_ids: list[int] | None = None
    if media == "application/json":
        body = await request.body()
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(422, f"body is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or (("xs" in obj) == ("sample_ids" in obj)):
            raise ApiError(422, 'JSON body must be an object with either "xs" (query arrays) or "sample_ids"')
        raw_xs, raw_ids = obj.pop("xs", None), obj.pop("sample_ids", None)
        params = _parse_params(obj)
        if raw_ids is not None:
            if not isinstance(raw_ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in raw_ids
            ):
                raise ApiError(422, "sample_ids: expected a list of integers")
            sample_ids = raw_ids
        else:
            if not isinstance(raw_xs, list):
                raise ApiError(422, "xs: expected a list of query arrays")
            if len(raw_xs) > state.settings.max_batch:
                raise ApiError(422, f"a batch holds at most {state.settings.max_batch} queries, got {len(raw_xs)}")
            s = state.settings
            xs = [
                await run_in_threadpool(decode_json_array, x, index, params.allow_resize, s.max_image_pixels)
                for x in raw_xs
            ]
    elif media in _RAW_TYPES:
        data = await request.body()
        params = _parse_params({k: _form_value(k, v) for k, v in request.query_params.items()})
        xs = await run_in_threadpool(decode_npy_batch, data, index)
    else:
        raise ApiError(
            415,
            f'unsupported content type {media or "(none)"!r}: send application/json with "xs" or "sample_ids", '
            "or one .npy array [B, *input shape] as application/octet-stream",
        )
    count = len(sample_ids) if sample_ids is not None else (0 if xs is None else len(xs))
    if count == 0:
        raise ApiError(422, "a batch needs at least one query")
    if count > state.settings.max_batch:
        raise ApiError(422, f"a batch holds at most {state.settings.max_batch} queries, got {count}")
    for sid in sample_ids or []:
        try:
            index.row_of(sid)
        except KeyError as e:
            raise ApiError(404, str(e.args[0])) from None
    check_params(params, index, state.settings.max_k)
    decode_ms = (time.perf_counter() - t0) * 1e3

    def work() -> list[InfluenceResponse]:
        return answer_batch(index, params, xs=xs, sample_ids=sample_ids, decode_ms=decode_ms)

    results = await _on_engine(state, engine, work)
    for res in results:
        for d in ("proponents", "opponents"):
            if d in res.search:
                state.metrics.candidates.observe(res.search[d].candidates)
    total = time.perf_counter() - t0
    return BatchInfluenceResponse(
        results=results,
        timings=BatchTimings(
            total_ms=total * 1e3,
            search_ms=results[0].timings.search_ms,
            queries_per_s=len(results) / total if total > 0 else 0.0,
        ),
    )


__all__ = ["router", "sniff", "decode_upload"]
