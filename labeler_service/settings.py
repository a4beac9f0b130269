"""Service configuration: every setting is an environment variable with the ``LABELER_`` prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Teacher input sizes a request or a command may ask for, in px (the REST schema and the CLI).
INPUT_SIZE_MIN, INPUT_SIZE_MAX = 32, 2048


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABELER_", extra="ignore")

    store: str = Field("store", description="Store path or fsspec URL.")
    data_root: Path = Field(Path("data"), description="Dataset paths in requests are inside it.")
    checkpoint_root: Path = Field(Path("checkpoints"),
                                  description="Checkpoint paths in requests are inside it.")
    redis_url: str = "redis://127.0.0.1:6379/0"
    api_keys: str = Field("", description="Comma-separated API keys.")
    api_keys_file: Path | None = Field(None, description="A file with one API key per line.")
    visibility_timeout: int = Field(3600, ge=10, description="Seconds before Redis redelivers "
                                    "an unacknowledged task (a worker lost mid-shard).")
    task_time_limit: int | None = Field(None, ge=5, description="Hard limit per shard task; "
                                        "default 80 % of the visibility timeout.")
    stall_seconds: float = Field(120, gt=0, description="A queued or running job with no "
                                 "progress for this long and no task in the broker (a task the "
                                 "broker lost) is planned again by the API.")
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    heatmap_max_pixels: int = Field(40_000_000, ge=1, description="Largest source image a "
                                    "heatmap is drawn over (a PNG decodes whole: ~4 bytes/px).")
    heatmap_concurrency: int = Field(4, ge=1, description="Heatmaps rendered at once per API "
                                     "process; more wait briefly, then get 503.")
    job_ttl_seconds: int = Field(7 * 24 * 3600, ge=86400, description="Finished jobs kept.")
    # What a client can hold before any key is checked (labeler_service/api/server.py).
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Largest request head "
                                  "(request line and headers) in bytes; a larger one is "
                                  "answered 431 and its connection closed.")
    header_timeout: float = Field(10, gt=0, description="Seconds a connection has to send a "
                                  "whole request head, from when it opened or from its previous "
                                  "response; then it is closed.")
    body_timeout: float = Field(10, gt=0, description="Seconds a connection has to send a "
                                "whole request body, from the end of its head (bodies are at "
                                "most max_body_bytes); then it is closed.")
    max_connections: int = Field(1000, ge=1, description="Open client connections per API "
                                 "process; one more closes the connection that has owed a "
                                 "request head or body the longest (or, with none owing, is "
                                 "answered 503).")
    listing_concurrency: int = Field(2, ge=1, description="Dataset listings (GET /v1/datasets) "
                                     "computed at once per API process, in threads of their "
                                     "own; more wait their turn while other routes answer.")
    # Worker side.
    device: str = "cuda"
    batch_size: int = Field(64, ge=1, description="Images per teacher batch, at most; see "
                            "max_batch_pixels.")
    max_batch_pixels: int = Field(8 * 1024 * 1024, ge=1, description="Input pixels per teacher "
                                  "batch, at most: large inputs get smaller batches (2048 px: 2 "
                                  "images), so memory stays bounded whatever a job asks for.")
    precision: str = "bf16"
    compile_teacher: bool = Field(False, description="torch.compile each teacher in its first "
                                  "shard task in a worker process, for the batch size capped at "
                                  "shard_size (minutes for NFNet-F6; see BENCHMARKS.md (b)).")
    decode_workers: int | None = None
    max_pixels: int | None = None
    shard_size: int = Field(1024, ge=1)
    max_shard_deliveries: int = Field(8, ge=1, description="Deliveries of one shard task "
                                      "(retries and redeliveries after a crash or a time-out "
                                      "included) before its images are failed and the job goes "
                                      "on without them.")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _time_limit_below_visibility(self) -> Settings:
        if self.task_time_limit is None:
            self.task_time_limit = int(self.visibility_timeout * 0.8)
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError("LABELER_TASK_TIME_LIMIT must be below LABELER_VISIBILITY_TIMEOUT, "
                             "or Redis redelivers a shard that is still being labeled")
        return self

    def batch_size_for(self, input_size: int) -> int:
        """The teacher batch for ``input_size`` px inputs: batch_size, fewer for large inputs."""
        return max(1, min(self.batch_size, self.max_batch_pixels // (input_size * input_size)))

    def api_key_list(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
        for key in keys:
            # HTTP headers are Latin-1 on the wire; clients send UTF-8: only ASCII matches.
            if not (key.isascii() and key.isprintable()):
                raise ValueError("an API key (LABELER_API_KEYS or LABELER_API_KEYS_FILE) has a "
                                 "character that is not printable ASCII; clients could not "
                                 "send it reliably: use letters, digits and punctuation")
        return keys


@lru_cache
def get_settings() -> Settings:
    return Settings()
