"""Configuration files, read once at start-up and validated with messages that name the file,
the field and the fix. Unknown keys are errors (a typo must not silently fall back to a
default). Paths inside a file are relative to that file's directory.

A consortium file (coordinator) names the members, the model and the policy; a node file
names the node's corpus, its quality score and its training settings.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tapestry.errors import UserError

if TYPE_CHECKING:  # the core imports torch; configuration checks must stay light
    from tapestry.training.consortium.model import ModelSpec
    from tapestry.training.consortium.policy import ContributionPolicy

NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class ConfigError(UserError, ValueError):
    """A configuration file that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    architecture: Literal["tiny-causal"] = "tiny-causal"
    vocab_size: int = Field(256, ge=1, le=1 << 20)
    hidden_size: int = Field(32, ge=1, le=1 << 16)

    def spec(self) -> ModelSpec:
        from tapestry.training.consortium.model import ModelSpec

        return ModelSpec(self.architecture, self.vocab_size, self.hidden_size)


class PolicyConfig(_Strict):
    quality_floor: float = Field(0.0, ge=0)
    max_node_weight: float = Field(1.0, gt=0, le=1)
    weighting: Literal["quality", "equal"] = "quality"

    def policy(self) -> ContributionPolicy:
        from tapestry.training.consortium.policy import ContributionPolicy

        return ContributionPolicy(self.quality_floor, self.max_node_weight, self.weighting)


class MemberConfig(_Strict):
    node_id: str = Field(pattern=NODE_ID_PATTERN)
    jurisdiction: str = Field(min_length=1)
    address: str
    # The consortium's own assessment of this member; replaces its self-reported score.
    quality_score: float | None = Field(None, ge=0, le=1e6)

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError(f"expected host:port, got {value!r}")
        return value


class ConsortiumConfig(_Strict):
    consortium_id: str = Field(min_length=1)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    policy: PolicyConfig = PolicyConfig()
    nodes: list[MemberConfig] = Field(min_length=1)
    node_timeout_s: float = Field(3600.0, gt=0)
    chunk_bytes: int = Field(1 << 20, ge=1024, le=4 << 20)

    @model_validator(mode="after")
    def _unique_nodes(self) -> ConsortiumConfig:
        ids = [node.node_id for node in self.nodes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"node_id must be unique, repeated: {duplicates}")
        return self


class TrainingConfig(_Strict):
    local_epochs: int = Field(3, ge=1, le=10_000)
    lr: float = Field(1e-3, gt=0, le=10)
    batch_size: int = Field(8, ge=1, le=1 << 20)
    max_seq_len: int = Field(128, ge=2, le=1 << 20)


class NodeConfig(_Strict):
    node_id: str = Field(pattern=NODE_ID_PATTERN)
    jurisdiction: str = Field(min_length=1)
    quality_score: float
    corpus: list[Path] = Field(min_length=1)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()

    @field_validator("quality_score")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


Config = TypeVar("Config", bound=_Strict)


def load_config(path: Path, kind: type[Config]) -> Config:
    """Parse and validate a TOML file; relative ``corpus`` paths resolve against its folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    if kind is NodeConfig and isinstance(raw.get("corpus"), list):
        raw["corpus"] = [
            str(path.parent / entry) if isinstance(entry, str) else entry for entry in raw["corpus"]
        ]
    try:
        return kind.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '(file)'}: {item['msg']}"
            for item in error.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
