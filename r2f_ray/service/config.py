"""Service configuration: one pydantic model, loadable from YAML with ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from r2f_ray.config import MODEL_HELP, TransferMode
from r2f_ray.core.lora import LoraSpec
from r2f_ray.core.unlearn import UnlearnConfig


class Limits(BaseModel):
    """Hard limits on what one HTTP request may ask for; anything beyond is refused with a 4xx."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(64 * 1024, ge=1024, description="largest accepted request body (413 above)")
    max_prompt_chars: int = Field(2000, ge=1, description="longest prompt, in characters")
    max_answer_chars: int = Field(500, ge=1, description="longest answer to forget, in characters")
    max_requests: int = Field(16, ge=1, description="most forget requests in one unlearn call")
    max_step: float = Field(100.0, gt=0, description="largest explicit step size")
    max_new_tokens: int = Field(128, ge=1, description="most tokens one generate call may ask for")
    max_queued_jobs: int = Field(32, ge=1, description="unlearn jobs waiting at once (429 above)")
    max_id_chars: int = Field(128, ge=1, description="longest request id or idempotency key")


class GenerateBatching(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, description="most generate requests answered by one forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")


class ServiceConfig(BaseModel):
    """Everything the unlearning service needs. ``state_dir`` holds the versions, jobs and audit log."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description=MODEL_HELP)
    bank: str = Field("naive", description="'naive' (grad_B @ A0, no training) or the path of a decoder bank")
    bank_transfer: TransferMode | None = Field(
        None, description="load a bank trained on another model: same_shapes (its architecture) or by_role_depth (other shapes)")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA spec of the naive bank")
    state_dir: Path = Field(Path("r2f_state"), description="versions, job records and the audit log")
    tokens_file: Path | None = Field(None, description="bearer tokens, one 'name token' per line")
    tokens_env: str = Field("R2F_SERVICE_TOKENS", description="env variable with 'name:token' pairs, comma-separated")
    generate_requires_auth: bool = Field(False, description="also demand a token on /v1/generate")
    allow_unauthenticated: bool = Field(False, description="start without any token (mutations then need none): local use only")
    methods: tuple[str, ...] | None = Field(None, description="engine methods a caller may ask for (default: all)")
    engine: UnlearnConfig = Field(default_factory=UnlearnConfig, description="the unlearning engine's settings")
    default_views: int = Field(5, ge=1)
    num_gpus: float = Field(0, ge=0, description="GPUs of the replica; >1 spreads the target with device_map='auto'")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved for the replica")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica holds at once (Ray Serve)")
    activate_wait_s: float = Field(120.0, gt=0, description="how long activate waits for a running job (409 after)")
    limits: Limits = Field(default_factory=Limits)
    batching: GenerateBatching = Field(default_factory=GenerateBatching)
