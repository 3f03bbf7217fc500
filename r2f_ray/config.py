"""Typed configs, loadable from YAML and shared by the CLI, the jobs and the service.

Each stage defines its config as a pydantic model next to the code that uses it; this module holds the
loading rules they share: a YAML file, then ``key=value`` overrides (dotted keys for nested fields).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)

# Loading a decoder bank for another model than its proxy (``DecoderBank.load``). same_shapes: the target has
# the proxy's architecture (e.g. a fine-tune of it); decoders are reused as-is. by_role_depth: any target;
# decoders are mapped by matrix role and relative depth and calibrated on the target's input covariances
# (forward passes only, see ``DecoderBank.map_by_role_depth``).
TransferMode = Literal["same_shapes", "by_role_depth"]

# The model specs every stage accepts (see ``assets.load_model``).
MODEL_HELP = "'default' (SmolLM2-135M-Instruct), 'gemma3-270m' (optional extra), 'tiny', or a local HF folder"

# The fewest question/answer facts token weights are fitted on: 5 coefficients per matrix
# (``r2f_ray.core.decoders.TOKEN_FEATURES``).
MIN_TOKEN_WEIGHT_FACTS = 8


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> C:
    """Build ``cls`` from an optional YAML file plus overrides (a dict, or ``["a.b=1", ...]`` strings
    whose values are parsed as YAML scalars)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data.update(loaded)
    if isinstance(overrides, list):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
            k, v = item.split("=", 1)
            parsed[k.strip()] = yaml.safe_load(v)
        overrides = parsed
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid {cls.__name__}: {problems}") from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
