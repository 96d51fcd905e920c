"""Server settings: environment variables with the prefix ``PROPONENT_`` (and a ``.env`` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROPONENT_", env_file=".env", extra="ignore")

    index: str | Path | None = Field(None, description="index to serve: a directory or s3://bucket/prefix")
    state_dir: Path = Field(Path("./state"), description="job state and results")
    device: str = Field("auto", description="torch device for query featurization: auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, ge=1, description="torch/FAISS threads (default: all cores)")
    max_k: int = Field(1000, ge=1)
    max_batch: int = Field(256, ge=1)  # queries in one POST /v1/influence/batch
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(16_777_216, ge=1)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated; empty = open")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; empty = CORS off"
    )
    queue_size: int = Field(64, ge=1, description="queries waiting for a worker before 503")
    query_workers: int = Field(1, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    factors_max_rows: int = Field(5000, ge=10)
    memory_budget: str | None = Field(
        None, description="bytes of features to hold in memory, e.g. 8G (default: half the available RAM)"
    )
    feature_mode: str = Field("auto", description="auto | memory | quantized | stream (auto: from the budget)")
    cache_dir: Path | None = Field(
        None, description="local cache of chunks read from an object-store index (default ~/.cache/proponent)"
    )
    cache_bytes: str = Field("8G", description="at most this much in the chunk cache, e.g. 8G")
    malloc_arenas: int = Field(
        2, ge=0, description="glibc malloc arenas for the server's threads (bounds RSS under many clients; 0: glibc's)"
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v
