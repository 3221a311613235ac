"""Configuration files, read once at start-up and validated with messages that name the file,
the field and the fix. Unknown keys are errors (a typo must not silently fall back to a
default). Paths inside a file are relative to that file's directory.

A consortium file (coordinator) names the members, the model and the policy; a node file
names the node's corpus, its quality score and its training settings.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from tapestry.address import check_address
from tapestry.atomic_files import write_text
from tapestry.errors import UserError
from tapestry.hf_config import check_hf_config, read_hf_config_dir
from tapestry.limits import (
    DEFAULT_EVALUATION_TIMEOUT_S,
    DEFAULT_LINK_STREAMS,
    DEFAULT_WINDOW_BUDGET_MIB,
    MAX_BATCH_SIZE,
    MAX_CHUNK_BYTES,
    MAX_CONTEXT_LENGTH,
    MAX_HEADS,
    MAX_HELDOUT_PERCENT,
    MAX_HIDDEN_SIZE,
    MAX_LAYERS,
    MAX_LINK_STREAMS,
    MAX_LOCAL_EPOCHS,
    MAX_LOCAL_LR,
    MAX_MEMBERS,
    MAX_MODEL_PARAMS,
    MAX_NODE_TIMEOUT_S,
    MAX_QUALITY,
    MAX_ROUND_NUM,
    MAX_SEQ_LEN,
    MAX_SUPERSEDED,
    MAX_TRANSFER_TIMEOUT_S,
    MAX_VOCAB_SIZE,
    MAX_WINDOW_BUDGET_MIB,
    MIN_CHUNK_BYTES,
)
from tapestry.training.consortium.governance.acceptance import (
    DEFAULT_HARM_SCALE,
    DEFAULT_MAX_HALVINGS,
    DEFAULT_TOLERANCE,
    AcceptancePolicy,
    AcceptanceRule,
)
from tapestry.training.consortium.governance.policy import (
    CONSORTIUM_MAX_DELTA_NORM_RATIO,
    CONSORTIUM_MAX_NODE_WEIGHT,
    ContributionPolicy,
    ContributionWeighting,
    checked_max_delta_norm,
    checked_max_delta_norm_ratio,
    checked_max_node_weight,
    checked_quality_floor,
)
from tapestry.training.consortium.models.spec import ARCHITECTURE_FIELDS, ModelSpec, canonical_json
from tapestry.training.consortium.strategies.settings import (
    IntegrationStrategy,
    OuterOptimizer,
    StrategyName,
    checked_clip_delta_norm,
    checked_outer_lr,
    checked_outer_momentum,
    checked_trim_fraction,
)

NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


# The names of tapestry.wire.delta_encoding.DeltaEncoding (that module imports torch; a test
# keeps the two lists equal).
DeltaEncodingName = Literal["float32", "bfloat16", "float16", "int8_block"]


class ConfigError(UserError, ValueError):
    """A configuration file that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    # No NaN or infinity anywhere: `quality_floor = inf` or `node_timeout_s = nan` is a typo,
    # never a setting. A field's docstring is its description (the generated configuration
    # reference, docs/reference/configuration.md, prints it).
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class TlsConfig(_Strict):
    """Mutual TLS (section ``[tls]``): the consortium CA's certificate, this server's
    certificate and key, and optionally the CRL (revoked callers are refused; the file is
    read again when it changes). Made by `tapestry certs`; relative paths are relative to
    the configuration file's folder."""

    ca: Path
    """The consortium CA's certificate (``ca.pem``)."""
    cert: Path
    """This server's certificate (``coordinator/cert.pem`` or ``nodes/<id>/cert.pem``)."""
    key: Path
    """This server's private key; refused when group or others may read it."""
    crl: Path | None = None
    """The consortium's revocation list (``crl.pem``), read again whenever it changes."""


# Corpora are UTF-8 bytes: token ids 0..255.
BYTE_VOCAB = 256
GPT_DEFAULTS: dict[str, Any] = {
    "n_layers": 2,
    "n_heads": 2,
    "context_length": 128,
    "tie_embeddings": True,
}


class ModelTable(_Strict):
    """Section ``[model]``: the architecture every member trains and its shape
    (docs/concepts/models.md). The consortium file and every node file carry the same one;
    it is read into the one :class:`~tapestry.training.consortium.models.spec.ModelSpec`
    (:func:`model_from_table`), which is what the configuration holds.

    - ``tiny-causal`` (default): ``vocab_size``, ``hidden_size``.
    - ``gpt``: also ``n_layers``, ``n_heads`` (dividing ``hidden_size``),
      ``context_length`` and ``tie_embeddings`` (defaults 2, 2, 128, true).
    - ``hf-causal-lm``: ``hf_config``, a ``transformers`` config as an inline table with
      ``model_type`` and ``vocab_size``, or ``hf_config_dir``, a local folder holding its
      ``config.json``, read when this file is loaded (and then held as ``hf_config``).
      ``vocab_size`` is the config's. Keys set to null are left out (the model type's
      default applies); ``auto_map`` and ``trust_remote_code`` are refused: no code from
      elsewhere runs.

    ``gpt`` and ``hf-causal-lm`` read byte corpora, so their ``vocab_size`` is at least 256.
    A field the architecture does not read is refused, so a typo cannot pass unnoticed.
    Each dimension has its own bound (a typo of a few digits is refused) and the whole
    model is bounded by ``MAX_MODEL_PARAMS``.
    """

    architecture: Literal["tiny-causal", "gpt", "hf-causal-lm"] = "tiny-causal"
    """The model every member builds: the proof of concept's embedding and linear head, the
    byte-level transformer written here, or a ``transformers`` causal LM."""
    vocab_size: int = Field(BYTE_VOCAB, ge=1, le=MAX_VOCAB_SIZE)
    """Number of token ids (byte tokens: 256); for ``hf-causal-lm``, taken from its config."""
    hidden_size: int = Field(32, ge=1, le=MAX_HIDDEN_SIZE)
    """Width of the embedding and hidden layers (``tiny-causal``, ``gpt``)."""
    n_layers: int | None = Field(None, ge=1, le=MAX_LAYERS)
    """Transformer blocks (``gpt``; 2 when unset)."""
    n_heads: int | None = Field(None, ge=1, le=MAX_HEADS)
    """Attention heads per block, dividing ``hidden_size`` (``gpt``; 2 when unset)."""
    context_length: int | None = Field(None, ge=1, le=MAX_CONTEXT_LENGTH)
    """Most positions one input may hold (``gpt``; 128 when unset)."""
    tie_embeddings: bool | None = None
    """Whether the output head shares the token embedding's weight (``gpt``; true when
    unset)."""
    hf_config: dict[str, Any] | None = None
    """The ``transformers`` config as an inline table (``hf-causal-lm``); or give
    ``hf_config_dir``, a local folder holding ``config.json``."""

    @model_validator(mode="before")
    @classmethod
    def _read_hf_config(cls, raw: Any) -> Any:
        """Fill what the architecture implies before the fields are checked: the gpt
        defaults; the hf config read from ``hf_config_dir``, its nulls dropped, and
        ``vocab_size`` taken from it."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        architecture = raw.get("architecture")
        if architecture == "gpt":
            for name, value in GPT_DEFAULTS.items():
                raw.setdefault(name, value)
        if "hf_config_dir" in raw:
            if architecture != "hf-causal-lm":
                raise ValueError("hf_config_dir applies to architecture 'hf-causal-lm' only")
            if "hf_config" in raw:
                raise ValueError("give hf_config (inline) or hf_config_dir, not both")
            raw["hf_config"] = read_hf_config_dir(Path(raw.pop("hf_config_dir")))
        config = raw.get("hf_config")
        if architecture == "hf-causal-lm" and isinstance(config, dict):
            raw["hf_config"] = config = {k: v for k, v in config.items() if v is not None}
            vocab = config.get("vocab_size")
            if "vocab_size" not in raw and isinstance(vocab, int):
                raw["vocab_size"] = vocab
        return raw

    @model_validator(mode="after")
    def _fits_architecture(self) -> ModelTable:
        used = {
            "tiny-causal": {"vocab_size", "hidden_size"},
            "gpt": {"vocab_size", "hidden_size", *GPT_DEFAULTS},
            "hf-causal-lm": {"vocab_size", "hf_config"},
        }[self.architecture]
        unused = sorted(
            name
            for name in self.model_fields_set - used - {"architecture"}
            # hidden_size has a default that every file written by write_config repeats
            if not (name == "hidden_size" and self.hidden_size == 32)
            and getattr(self, name) is not None
        )
        if unused:
            raise ValueError(
                f"{', '.join(unused)} does not apply to architecture {self.architecture!r}; "
                "remove it (docs/concepts/models.md)"
            )
        if self.architecture != "tiny-causal" and self.vocab_size < BYTE_VOCAB:
            raise ValueError(
                f"vocab_size = {self.vocab_size} cannot hold byte tokens (0..255): the "
                f"{self.architecture} model reads byte corpora; use at least {BYTE_VOCAB}"
            )
        if self.architecture == "gpt":
            heads = self.n_heads or 1
            if self.hidden_size % heads:
                raise ValueError(
                    f"hidden_size = {self.hidden_size} is not divisible by n_heads = {heads}: "
                    "each attention head takes an equal slice of the width"
                )
        if self.architecture == "hf-causal-lm":
            check_hf_config(self.hf_config, self.vocab_size)
        params = self.estimated_params()
        if params > MAX_MODEL_PARAMS:
            raise ValueError(
                f"the model would hold about {params:,} parameters, more than "
                f"MAX_MODEL_PARAMS = {MAX_MODEL_PARAMS:,}; lower hidden_size "
                "(or vocab_size, n_layers)"
            )
        return self

    def estimated_params(self) -> int:
        """Parameters of the configured model, counted from its shape without building it
        (exact for ``tiny-causal``, within a few per cent for ``gpt``; 0 for
        ``hf-causal-lm``, whose size its own config decides: it is counted on torch's
        meta device when the model is built, ``hf_causal_lm.hf_parameter_count``, which
        a configuration file is read without)."""
        vocab, hidden = self.vocab_size, self.hidden_size
        if self.architecture == "tiny-causal":
            return 2 * vocab * hidden + vocab
        if self.architecture == "gpt":
            heads = 1 if self.tie_embeddings else 2
            layers = self.n_layers or GPT_DEFAULTS["n_layers"]
            context = self.context_length or GPT_DEFAULTS["context_length"]
            return heads * vocab * hidden + context * hidden + layers * 12 * hidden * hidden
        return 0

    def spec(self) -> ModelSpec:
        """The spec this table names."""
        if self.architecture == "tiny-causal":
            return ModelSpec(self.architecture, self.vocab_size, self.hidden_size)
        if self.architecture == "gpt":
            return ModelSpec(
                self.architecture,
                self.vocab_size,
                self.hidden_size,
                n_layers=self.n_layers or GPT_DEFAULTS["n_layers"],
                n_heads=self.n_heads or GPT_DEFAULTS["n_heads"],
                context_length=self.context_length or GPT_DEFAULTS["context_length"],
                tie_embeddings=bool(self.tie_embeddings),
            )
        return ModelSpec(
            self.architecture, self.vocab_size, hf_config=canonical_json(self.hf_config or {})
        )


def model_from_table(raw: object) -> ModelSpec:
    """The ``[model]`` table (or a spec already built) as the one :class:`ModelSpec`,
    checked as :class:`ModelTable` says."""
    if isinstance(raw, ModelSpec):
        raw = model_table(raw)
    return ModelTable.model_validate(raw).spec()


def model_table(spec: ModelSpec) -> dict[str, Any]:
    """``spec`` as its ``[model]`` table, the keys its architecture reads (and the table's
    ``hidden_size``, which every table holds), ``hf_config`` as a table. A data directory
    records this table as the consortium's identity, so it must stay what it always was."""
    table: dict[str, Any] = {"architecture": spec.architecture}
    for name in ("vocab_size", "hidden_size", *ARCHITECTURE_FIELDS.get(spec.architecture, ())):
        if name == "hf_config":
            table[name] = json.loads(spec.hf_config)
        elif name not in table:
            table[name] = getattr(spec, name)
    return table


def context_length_limit(spec: ModelSpec) -> int | None:
    """The most positions one input may hold, where the model has such a bound."""
    if spec.architecture == "gpt":
        return spec.context_length
    if spec.architecture == "hf-causal-lm":
        config = json.loads(spec.hf_config)
        for key in ("n_positions", "max_position_embeddings"):
            value = config.get(key)
            if isinstance(value, int):
                return value
    return None


TABLES: dict[type, type[BaseModel]] = {ModelSpec: ModelTable}
"""The table a configuration value is read from, where the value is not itself a table
model (``[model]`` is read by :class:`ModelTable` into a :class:`ModelSpec`)."""

ModelSpecField = Annotated[
    ModelSpec,
    PlainValidator(model_from_table, json_schema_input_type=dict[str, Any]),
    PlainSerializer(model_table),
]
"""A ``[model]`` table in a configuration file, held as the one :class:`ModelSpec`."""


class LinkConfig(_Strict):
    """Section ``[link]``: the network between the coordinator and the members, from which
    the HTTP/2 flow-control windows are sized so that one connection fills it
    (``tapestry.wire.windows``; docs/operating/network.md). The defaults are an
    intercontinental research link."""

    bandwidth_mbit: float = Field(1000.0, gt=0, le=400_000)
    """The link's bandwidth in Mbit/s (the slowest member's, for the coordinator)."""
    rtt_ms: float = Field(200.0, gt=0, le=5_000)
    """The round trip between the coordinator and a member, in ms (the longest member's)."""
    window_budget_mib: int = Field(DEFAULT_WINDOW_BUDGET_MIB, ge=4, le=MAX_WINDOW_BUDGET_MIB)
    """The most this process lets be in flight toward it over all its streams together, in
    MiB: each stream's window is at most this divided by the streams that can be open at
    once (a coordinator: ``streams`` per member), so memory stays flat in the number of
    members."""
    streams: int = Field(DEFAULT_LINK_STREAMS, ge=1, le=MAX_LINK_STREAMS)
    """The connections ("lanes") each member's session spreads its transfers over, the
    coordinator's setting (a node opens what the welcome says): where one TCP connection
    cannot fill the link (a system's largest socket buffer below the bandwidth-delay
    product), several do, as PCCL and GridFTP spread transfers."""


class DilocoConfig(_Strict):
    """``[policy.diloco]``: DiLoCo's outer optimizer (SGD with momentum on the round's
    pseudo-gradient); the defaults are the DiLoCo paper's."""

    outer_lr: Annotated[float, AfterValidator(checked_outer_lr)] = OuterOptimizer.lr
    """The outer learning rate the pseudo-gradient step is scaled by, in (0, 10]."""
    momentum: Annotated[float, AfterValidator(checked_outer_momentum)] = OuterOptimizer.momentum
    """The outer momentum, in [0, 1); 0 with ``outer_lr = 1`` is ``fedavg``."""
    nesterov: bool = OuterOptimizer.nesterov
    """Nesterov momentum (step ``g + momentum * m``) rather than plain (step ``m``)."""


class AcceptanceConfig(_Strict):
    """``[policy.acceptance]``: member-validated commit. After integrating, the coordinator
    has each member that contributed evaluate the candidate base on its held-out split, and
    the rule decides whether it is committed, a shorter step toward it, or nothing
    (docs/concepts/policy.md says what a lying member can and cannot do under each)."""

    rule: AcceptanceRule | Literal["off"] = AcceptanceRule.NO_REGRESSION
    """``no_regression`` (no member's held-out loss rises by more than ``tolerance``),
    ``mean_improves``, ``majority_improves``, or ``off``: the round commits whatever the
    weighted deltas give."""
    tolerance: float = DEFAULT_TOLERANCE
    """Nats a member's held-out loss may rise before it objects, in [0, 10]."""
    max_halvings: int = DEFAULT_MAX_HALVINGS
    """How many times a refused step is halved and evaluated again before the round gives
    up with the base unchanged, in [0, 10]."""
    drop_one: bool = False
    """When no step is accepted: integrate again without each accepted contribution in
    turn, have the members evaluate each such candidate, and commit the accepted one whose
    members' median change is lowest. Costs one candidate per accepted member, sent to every
    member, and lets a member tell the dropped contribution's weighted delta from the
    difference of two candidates (docs/concepts/policy.md)."""
    measure_quality: bool = False
    """Weigh each contribution by what leaving it out does to the other members' held-out
    losses, from their evaluations of the round's probes (the candidate, and the candidate
    without each contribution), in place of the quality scores claimed or assessed. Costs
    one candidate per accepted member each round, sent to every member, and shows each
    member every accepted contribution's weighted delta (docs/concepts/policy.md)."""
    harm_scale: float = DEFAULT_HARM_SCALE
    """With ``measure_quality``: nats of harm to the other members (how much lower their
    held-out loss is without a contribution, the median over them) that cut its score to
    1/e, in (0, 10]."""
    timeout_s: float = Field(DEFAULT_EVALUATION_TIMEOUT_S, gt=0, le=MAX_NODE_TIMEOUT_S)
    """Deadline of one member's evaluation of one step, the candidate's transfer included,
    in seconds; a member that does not answer in time does not count for that step."""

    @model_validator(mode="after")
    def _the_core_accepts_it(self) -> AcceptanceConfig:
        self.policy()
        if self.rule == "off" and (self.drop_one or self.measure_quality):
            raise ValueError(
                "drop_one and measure_quality work through the members' evaluations, which "
                'rule = "off" turns off'
            )
        return self

    def policy(self) -> AcceptancePolicy | None:
        """The core's acceptance policy (``None``: off)."""
        if self.rule == "off":
            return None
        return AcceptancePolicy(
            AcceptanceRule(self.rule),
            self.tolerance,
            self.max_halvings,
            self.drop_one,
            self.measure_quality,
            self.harm_scale,
        )


class LocalTraining(_Strict):
    """How a model is trained from each round's base: the settings a node's ``[training]``
    and the coordinator's reference (``[policy.reference]``) share."""

    local_epochs: int = Field(3, ge=1, le=MAX_LOCAL_EPOCHS)
    """Passes over the training windows per round."""
    lr: float = Field(1e-3, gt=0, le=MAX_LOCAL_LR)
    """The local optimizer's learning rate."""
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE)
    """Windows per optimizer step: the global batch, however many processes train it."""
    max_seq_len: int = Field(128, ge=2, le=MAX_SEQ_LEN)
    """Windows of at most this many byte tokens are cut from each line."""


class ReferenceTraining(LocalTraining):
    """``[policy.reference]``: how the coordinator trains its reference update each round
    from the round's base on ``reference_corpus`` (measured quality). The defaults are a
    node's ``[training]`` defaults; set them to what the members use, so that the
    reference's step is the size of an honest member's (a delta larger than the reference
    scores less in proportion)."""


class PolicyConfig(_Strict):
    """The contribution policy of a consortium run by the services. Its defaults are chosen
    so that no single member can capture the base: no member takes more than half the
    weight (so at least two members must contribute for a round to integrate), quality
    scores are in [0, 1], and a delta more than ten times the round's median norm is
    refused (which binds once honest members are the majority: three or more).
    docs/concepts/policy.md and docs/concepts/strategies.md say how each setting acts.
    Each setting is checked once, by the core's own check for it."""

    quality_floor: Annotated[float, AfterValidator(checked_quality_floor)] = 0.0
    """A contribution whose quality score is below this (>= 0) is rejected."""
    max_node_weight: Annotated[float, AfterValidator(checked_max_node_weight)] = (
        CONSORTIUM_MAX_NODE_WEIGHT
    )
    """The cap, in (0, 1]: no member takes more than this share of the weight. With ``k``
    members, ``k * max_node_weight`` must be at least 1."""
    weighting: ContributionWeighting = ContributionWeighting.QUALITY
    """How the accepted members are weighed: in proportion to their quality scores (each
    held to the cap), or equally."""
    max_delta_norm: Annotated[float | None, AfterValidator(checked_max_delta_norm)] = None
    """A delta whose L2 norm is above this (> 0) is rejected (no bound when unset)."""
    max_delta_norm_ratio: Annotated[float | None, AfterValidator(checked_max_delta_norm_ratio)] = (
        CONSORTIUM_MAX_DELTA_NORM_RATIO
    )
    """A delta whose L2 norm is more than this multiple (> 1) of the round's median delta
    norm is rejected; it binds once honest members are the majority (three or more)."""
    min_nodes: int | None = Field(None, ge=1, le=MAX_MEMBERS)
    """The quorum: a round in which fewer members contribute (answer with a contribution
    that passes every check) is aborted, recorded with the base unchanged. Unset, it is the
    cap's own quorum, ``ceil(1/max_node_weight)`` (2 with the default cap)."""
    strategy: StrategyName = StrategyName.FEDAVG
    """How the accepted deltas are combined into the next base."""
    trim_fraction: Annotated[float | None, AfterValidator(checked_trim_fraction)] = None
    """``trimmed_mean`` only: the share of values dropped from each end per coordinate, in
    [0, 0.5) (0.2 when unset)."""
    clip_delta_norm: Annotated[float | None, AfterValidator(checked_clip_delta_norm)] = None
    """Any strategy: an accepted delta whose L2 norm is above this (> 0) is scaled down to
    it."""
    diloco: DilocoConfig | None = None
    """``diloco`` only: the outer optimizer's settings."""
    acceptance: AcceptanceConfig = AcceptanceConfig()
    """Member-validated commit: the rule the members' evaluations of each round's candidate
    are judged by (on by default: ``no_regression``)."""
    reference_corpus: Path | None = None
    """Quality measured, not claimed (docs/concepts/policy.md): a public corpus the
    consortium agreed on, a UTF-8 text file or a folder of them (every file under it), read
    as a node reads its corpus; relative to the consortium file's folder. Each round the
    coordinator trains the round's base on it and weighs each member by its delta's
    direction and size against that update, instead of by any claimed or assessed score.
    Unset, members are weighed by the consortium's assessment or their own claim."""
    reference: ReferenceTraining | None = None
    """With ``reference_corpus``: how the coordinator trains its reference update (a node's
    ``[training]`` defaults when unset)."""

    @field_validator("reference_corpus")
    @classmethod
    def _a_file_or_folder(cls, path: Path | None) -> Path | None:
        if path is not None and not (path.is_file() or path.is_dir()):
            raise ValueError(
                f"{str(path)!r} is no file or folder; give the reference corpus's path "
                "(relative to the consortium file's folder)"
            )
        return path

    @model_validator(mode="after")
    def _the_core_accepts_it(self) -> PolicyConfig:
        """What no single setting shows: a setting of another strategy (it would be silently
        ignored), a floor above the highest score. The core's policy says so. And
        ``[policy.reference]`` without a corpus to train it on."""
        self.policy()
        if self.reference is not None and self.reference_corpus is None:
            raise ValueError(
                "[policy.reference] trains the reference update on reference_corpus, which "
                "is unset; set policy.reference_corpus or remove [policy.reference]"
            )
        if self.reference_corpus is not None and self.acceptance.measure_quality:
            raise ValueError(
                "policy.reference_corpus and policy.acceptance.measure_quality each replace "
                "the members' quality scores; choose one"
            )
        return self

    def reference_training(self) -> ReferenceTraining:
        """How the reference update is trained: ``[policy.reference]``, or its defaults."""
        return self.reference or ReferenceTraining()

    def quorum(self) -> int:
        """``min_nodes``, or when unset the cap's quorum ``ceil(1/max_node_weight)``."""
        if self.min_nodes is not None:
            return self.min_nodes
        return cap_quorum(self.max_node_weight)

    def strategy_settings(self) -> IntegrationStrategy:
        """The strategy and its parameters, as the core checks them."""
        diloco = self.diloco or (DilocoConfig() if self.strategy == "diloco" else None)
        return IntegrationStrategy(
            self.strategy,
            trim_fraction=self.trim_fraction,
            clip_delta_norm=self.clip_delta_norm,
            outer=(
                OuterOptimizer(diloco.outer_lr, diloco.momentum, diloco.nesterov)
                if diloco is not None
                else None
            ),
        )

    def policy(self) -> ContributionPolicy:
        """The core's policy for these settings (scores above ``MAX_QUALITY`` refused)."""
        return ContributionPolicy(
            self.quality_floor,
            self.max_node_weight,
            self.weighting,
            max_quality=MAX_QUALITY,
            max_delta_norm=self.max_delta_norm,
            max_delta_norm_ratio=self.max_delta_norm_ratio,
            strategy=self.strategy_settings(),
        )


class MemberConfig(_Strict):
    """One ``[[nodes]]`` entry of a consortium file: a member, in integration order."""

    node_id: str = Field(pattern=NODE_ID_PATTERN)
    """The member's id: its node file's ``node_id`` and its certificate's name."""
    jurisdiction: str = Field(min_length=1)
    """The member's jurisdiction, as its node file names it."""
    address: str | None = None
    """Where the member's node listens, ``HOST:PORT`` (port 1..65535), for a node that
    accepts connections: the coordinator then dials it. Unset (the default), the node
    dials out: it connects to the coordinator and holds a session, and opens no port."""
    quality_score: float | None = Field(None, ge=0, le=MAX_QUALITY)
    """The consortium's own assessment of this member; when set, the policy weighs it
    instead of the node's self-reported score."""

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return None if value is None else check_address(value)


class ConsortiumConfig(_Strict):
    """A consortium file (``coordinator serve --config``): the members, the model and the
    policy."""

    consortium_id: str = Field(min_length=1)
    """The consortium's name; every node file names it, and a cycle for another is refused."""
    seed: int = 0
    """The initial base and every node's shuffling derive from it."""
    model: ModelSpecField = ModelSpec()
    """The model every member trains."""
    policy: PolicyConfig = PolicyConfig()
    """Who counts, with what weight, and how deltas combine."""
    nodes: list[MemberConfig] = Field(min_length=1)
    """The members."""
    node_timeout_s: float = Field(3600.0, gt=0, le=MAX_NODE_TIMEOUT_S)
    """Deadline of one node's cycle, in seconds (at most a week)."""
    resume_window_s: float = Field(120.0, gt=0, le=MAX_NODE_TIMEOUT_S)
    """How long a cycle whose session dropped waits for its node to dial again, in seconds;
    it then goes on from the last message that arrived. Past it the node fails the round."""
    chunk_bytes: int = Field(1 << 20, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)
    """Size of the chunks tensors are cut into on the wire, in bytes."""
    delta_encoding: DeltaEncodingName = "float32"
    """How nodes send their deltas' floating tensors: ``float32`` raw and exact;
    ``bfloat16``, ``float16`` or ``int8_block`` in fewer bytes within a stated error bound
    (``tapestry.wire.delta_encoding``; docs/operating/encodings.md)."""
    link: LinkConfig = LinkConfig()
    """The network to the members, for the flow-control windows."""
    tls: TlsConfig | None = None
    """Mutual TLS; without it the server starts only with ``--insecure``."""

    @model_validator(mode="after")
    def _unique_nodes(self) -> ConsortiumConfig:
        ids = [node.node_id for node in self.nodes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"node_id must be unique, repeated: {duplicates}")
        return self

    @model_validator(mode="after")
    def _cap_can_hold(self) -> ConsortiumConfig:
        """Weights summing to 1 with none above the cap need ``k · cap >= 1``: with fewer
        members than that no round could ever integrate anything (the core would reject
        every node each round), so the file is refused before the server starts."""
        cap, k = self.policy.max_node_weight, len(self.nodes)
        if k * cap < 1:
            need = cap_quorum(cap)
            raise ValueError(
                f"policy.max_node_weight = {cap} can never hold with the {k} configured "
                f"node(s): weights that sum to 1 under that cap need a quorum of at least "
                f"{need} nodes (ceil(1/max_node_weight)); add members or raise "
                f"max_node_weight to at least {1 / k:.4g}"
            )
        return self

    @model_validator(mode="after")
    def _measured_quality_fits(self) -> ConsortiumConfig:
        """With a reference corpus, an assessed score would be silently ignored (measured
        quality replaces it), and the reference's windows must fit the model."""
        if self.policy.reference_corpus is None:
            return self
        assessed = [i for i, node in enumerate(self.nodes) if node.quality_score is not None]
        if assessed:
            raise ValueError(
                f"nodes[{assessed[0]}].quality_score is never weighed when "
                "policy.reference_corpus is set (measured quality replaces it); remove one"
            )
        check_window(
            self.model,
            self.policy.reference_training().max_seq_len,
            key="policy.reference.max_seq_len",
        )
        return self

    @model_validator(mode="after")
    def _evaluated_quality_has_members_enough(self) -> ConsortiumConfig:
        """Evaluated quality scores each member by the median of the other members'
        numbers: with fewer than four members, one liar's number is half of it or all of
        it, and so decides another member's score (docs/concepts/policy.md)."""
        k = len(self.nodes)
        if self.policy.acceptance.measure_quality and k < MIN_EVALUATED_MEMBERS:
            raise ValueError(
                f"policy.acceptance.measure_quality needs at least {MIN_EVALUATED_MEMBERS} "
                f"members, the consortium has {k}: with fewer, one member's evaluations "
                "decide another member's score"
            )
        return self

    @model_validator(mode="after")
    def _quorum_can_be_met(self) -> ConsortiumConfig:
        """A quorum above the number of members would abort every round."""
        need, k = self.policy.min_nodes, len(self.nodes)
        if need is not None and need > k:
            raise ValueError(
                f"policy.min_nodes = {need} can never be met with the {k} configured "
                f"node(s): every round would be aborted; lower it to at most {k} or add members"
            )
        return self


MIN_EVALUATED_MEMBERS = 4
"""The fewest members a consortium file may weigh by evaluated quality: each score is a
median over the other members, of which one liar must be no more than a minority."""


def cap_quorum(max_node_weight: float) -> int:
    """The fewest nodes whose weights can sum to 1 with none above ``max_node_weight``
    (as the policy computes it, tapestry.training.consortium.governance.policy)."""
    return math.ceil(1 / max_node_weight - 1e-12)


class TrainingConfig(LocalTraining):
    """Section ``[training]`` of a node file: how the node trains each cycle."""

    heldout_percent: int = Field(10, ge=0, le=MAX_HELDOUT_PERCENT)
    """About this share of the corpus's lines is held out, never trained on, and every
    round's base and sovereign model are evaluated on it (a seeded rule per line;
    docs/concepts/evaluation.md); 0 holds nothing out and evaluates nothing. At most 50:
    a node is there to train."""
    trainer: Literal["real", "synthetic"] = "real"
    """``synthetic`` replaces training by a seeded random update, for benchmarks that
    measure transport (``tapestry.training.consortium.local.node.TRAINERS``)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the node trains: ``cpu``, ``cuda`` (refused at start without a GPU) or
    ``auto`` (``cuda`` when torch finds one). Deltas and artifacts are CPU tensors whatever
    it is (docs/operating/torchrun.md)."""
    collective_timeout_s: float = Field(300.0, gt=0, le=MAX_NODE_TIMEOUT_S)
    """Under ``torchrun``, how long a rank waits in a collective (DDP's all-reduce) for the
    others before the cycle fails; it bounds how long a dead or stuck worker can hold a
    cycle."""


class NodeLimits(_Strict):
    """What a node accepts from whoever calls its cycle, so that a caller posing as the
    coordinator can neither rewrite the node's history, nor hold it busy, nor fill its disk
    with replays (DESIGN §5; docs/operating/security.md, "A node protects itself")."""

    max_round_gap: int = Field(1000, ge=1, le=MAX_ROUND_NUM)
    """A cycle may be at most this many rounds past the node's newest retained round (a
    node that was down or failed legitimately sees a jump; a forged round 4 000 000 000 is
    refused). Rounds below the newest retained one are always refused; the newest itself
    may run again (a coordinator re-running it after a crash)."""
    receive_timeout_s: float = Field(300.0, gt=0, le=MAX_TRANSFER_TIMEOUT_S)
    """The whole base must arrive within this many seconds of the call's start, else the
    call ends with DEADLINE_EXCEEDED and the node is free again."""
    decision_timeout_s: float = Field(3600.0, gt=0, le=MAX_TRANSFER_TIMEOUT_S)
    """After its result header the node waits this long for the coordinator's decision on
    its delta (the coordinator weighs every node first, so this covers the slowest
    member's training), else the call ends with DEADLINE_EXCEEDED."""
    send_timeout_s: float = Field(300.0, gt=0, le=MAX_TRANSFER_TIMEOUT_S)
    """The caller must take the whole delta within this many seconds of asking for it,
    else the call is cancelled and the node is free again."""
    max_model_params: int = Field(MAX_MODEL_PARAMS, ge=1, le=MAX_MODEL_PARAMS)
    """The most parameters of a model the coordinator's welcome may ask this node to build
    (counted from the spec before anything is built; an ``hf-causal-lm`` config on torch's
    meta device): set it to what the node's memory holds, so a coordinator (or whoever holds
    its key) cannot make the node allocate past it. Pinning ``model_sha256`` refuses any
    other model outright."""
    max_superseded: int = Field(3, ge=0, le=MAX_SUPERSEDED)
    """How many earlier artifacts of re-run rounds are kept aside
    (``round-NNNNNN.superseded-*``); beyond it the oldest are deleted. 0 keeps none."""


class TrustConfig(_Strict):
    """``[trust]``: which bases this node trains from (docs/operating/ledger.md). With mutual
    TLS, a base it did not train from before must be reached by commits the members
    accepted: each signed by at least ``min_acceptances`` members whose held-out loss did not
    rise past ``tolerance`` (member-validated commit). Plaintext nodes hold no CA and take
    the coordinator's word."""

    min_acceptances: int = Field(2, ge=0, le=MAX_MEMBERS)
    """Members' signed acceptances each new base needs; 0 takes the coordinator's word (a
    consortium whose ``[policy.acceptance] rule`` is ``off`` must set 0)."""
    tolerance: float = Field(DEFAULT_TOLERANCE, ge=0, le=10)
    """The rise, in nats, up to which a member's signed evaluation counts as accepting: at
    least the consortium's ``[policy.acceptance] tolerance``."""


class NodeConfig(_Strict):
    """A node file (``node serve --config``): the node's corpus, its quality score and its
    training settings."""

    node_id: str = Field(pattern=NODE_ID_PATTERN)
    """This node's id, as the consortium file's ``[[nodes]]`` entry names it."""
    jurisdiction: str = Field(min_length=1)
    """This node's jurisdiction."""
    consortium_id: str = Field(min_length=1, max_length=256)
    """The consortium this node serves: the consortium file's ``consortium_id``. A cycle
    that names another is refused."""
    quality_score: float = Field(ge=0, le=MAX_QUALITY)
    """The quality score the node reports with each contribution."""
    corpus: list[Path] = Field(min_length=1)
    """UTF-8 text files (globs allowed); every non-blank line is a document of byte
    tokens."""
    seed: int = 0
    """The consortium's seed: the held-out split and the node's shuffling derive from it."""
    coordinator: str | None = None
    """The coordinator to dial, ``HOST:PORT``: the node connects out, holds a session and
    opens no listening socket (the default way to run a node). Unset, the node listens
    (``node serve --listen``) and the coordinator dials it."""
    model: ModelSpecField | None = None
    """The consortium's model. A node that dials out takes it from the coordinator and
    needs none; given, it pins it: a coordinator that sends another is refused. A node that
    listens trains it (the default model without it); a coordinator with another refuses
    the node before weights move."""
    model_sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    """Pins the model by its digest (a dialing node logs the digest it is sent at each
    session's opening): a coordinator whose model has another is refused there."""
    training: TrainingConfig = TrainingConfig()
    """How the node trains."""
    limits: NodeLimits = NodeLimits()
    """What the node accepts from whoever calls its cycle."""
    link: LinkConfig = LinkConfig()
    """The network to the coordinator, for the flow-control window of the base's download."""
    trust: TrustConfig = TrustConfig()
    """Which bases the node trains from: its own check of the coordinator's word."""
    tls: TlsConfig | None = None
    """Mutual TLS; without it the server starts only with ``--insecure``."""

    @model_validator(mode="after")
    def _windows_fit_the_model(self) -> NodeConfig:
        """A window of ``max_seq_len`` tokens trains on ``max_seq_len - 1`` input positions,
        which must fit the model's context length."""
        if self.model is None:
            return self  # checked when a model is chosen (check_window)
        check_window(self.model, self.training.max_seq_len)
        return self

    @field_validator("coordinator")
    @classmethod
    def _dial_address(cls, value: str | None) -> str | None:
        return None if value is None else check_address(value)


def check_window(model: ModelSpec, max_seq_len: int, *, key: str = "training.max_seq_len") -> None:
    """A window of ``max_seq_len`` tokens (the setting ``key``) trains on
    ``max_seq_len - 1`` input positions, which must fit the model's context length
    (ValueError, naming the fix)."""
    limit, window = context_length_limit(model), max_seq_len
    if limit is not None and window - 1 > limit:
        raise ValueError(
            f"{key} = {window} gives inputs of {window - 1} positions, past "
            f"the model's context length {limit}; set max_seq_len to at most {limit + 1}"
        )


Config = TypeVar("Config", bound=_Strict)


def load_config(path: Path, kind: type[Config]) -> Config:
    """Parse and validate a TOML file; relative ``corpus``, ``tls``,
    ``model.hf_config_dir`` and ``policy.reference_corpus`` paths resolve against its
    folder."""
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
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("hf_config_dir"), str):
        raw["model"] = {**model, "hf_config_dir": str(path.parent / model["hf_config_dir"])}
    policy = raw.get("policy")
    if isinstance(policy, dict) and isinstance(policy.get("reference_corpus"), str):
        raw["policy"] = {
            **policy,
            "reference_corpus": str(path.parent / policy["reference_corpus"]),
        }
    if isinstance(raw.get("tls"), dict):
        raw["tls"] = {
            key: str(path.parent / value) if isinstance(value, str) else value
            for key, value in raw["tls"].items()
        }
    return build_config(kind, raw, str(path))


def build_config(kind: type[Config], raw: Mapping[str, Any], source: str) -> Config:
    """Validate ``raw`` as a ``kind``; a refusal is a :class:`ConfigError` that names
    ``source`` (a file, or whoever built the values) and every field at fault."""
    try:
        return kind.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_problem(kind, item) for item in error.errors())
        raise ConfigError(f"{source}: {problems}") from None


def _problem(kind: type[BaseModel], item: ErrorDetails) -> str:
    """One refusal: where, pydantic's reason and, for an unknown key, the closest valid one
    (in its own section first, else anywhere in the file: a key in the wrong section)."""
    where = ".".join(str(part) for part in item["loc"]) or "(file)"
    # A check of our own raised it: its message says it all, without pydantic's prefix.
    reason = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
    problem = f"{where}: {reason}"
    if item["type"] != "extra_forbidden" or not item["loc"]:
        return problem
    section, key = item["loc"][:-1], str(item["loc"][-1])
    close = difflib.get_close_matches(key, _keys_at(kind, section), n=1)
    if not close:
        anywhere = {path.rpartition(".")[2]: path for path in _key_paths(kind)}
        close = [anywhere[k] for k in difflib.get_close_matches(key, list(anywhere), n=1)]
    return f"{problem}; did you mean {close[0]!r}?" if close else problem


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``X``, ``X | None``, ``list[X]``), or None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation in TABLES:
        return TABLES[annotation]
    for argument in get_args(annotation):
        inner = _section_model(argument)
        if inner is not None:
            return inner
    return None


def _keys_at(kind: type[BaseModel], section: Sequence[int | str]) -> list[str]:
    """The keys valid in ``section`` (a validation error's location; list indices skipped)."""
    model: type[BaseModel] | None = kind
    for part in section:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _section_model(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _key_paths(kind: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every key of the file, as a dotted path (``training.local_epochs``)."""
    for name, field in kind.model_fields.items():
        yield prefix + name
        inner = _section_model(field.annotation)
        if inner is not None:
            yield from _key_paths(inner, f"{prefix}{name}.")


def write_config(path: Path, config: _Strict) -> Path:
    """Write ``config`` as a TOML file that :func:`load_config` reads back equal: every
    field, defaults included, so the file says all that the server will use (an unset
    optional field is left out: TOML has no null). Paths are written as they are held, so
    give absolute ones when the file lives elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, tomli_w.dumps(config.model_dump(mode="json", exclude_none=True)))
    return path
