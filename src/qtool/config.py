"""Quantization options as one frozen, validated, versioned dataclass.

The algorithm (``method``) and the packing ``format`` are separate axes; their
compatibility is checked here and against the model's layer shapes (``check_model``)
before any calibration work starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from qtool.errors import UserInputError

CONFIG_VERSION = 1
METHODS = ("rtn", "gptq", "awq", "awq-gptq", "signround")
GPTQ_METHODS = ("gptq", "awq-gptq")  # quantize with the GPTQ solver (act-order, damp, ...)
AWQ_METHODS = ("awq", "awq-gptq")  # search and fold AWQ scales first (proven folds, --awq-* options)
SCALE_SEARCHES = ("minmax", "mse")
GROUP_SIZE_CANDIDATES = (128, 64, 32)
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
MIXED_METHODS = METHODS  # per-layer bit widths (--bits-budget): each method quantizes (and searches) at a layer's width
MIXED_FORMATS = ("compressed-tensors", "gptq")  # formats whose config states per-layer widths


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything that determines a quantization result (and its fingerprint).

    ``group_size=0`` means "auto": resolved by ``resolve_group_size`` to the largest of
    128/64/32 that divides every quantized layer's in_features. ``sym=None`` means the
    method's default (symmetric for rtn/gptq, asymmetric for awq/awq-gptq).

    ``scale_search`` picks each group's range: ``"minmax"``, or ``"mse"``: the min-max
    range shrunk by the ratio of ``1, 1 - max_shrink / grid, ..., 1 - max_shrink`` that
    reproduces the group best (``qtool.rtn.mse_qparams``, in the GPTQ solver; refused for RTN,
    where it measured worse than min-max).

    GPTQ act-order has three kinds (``act_order_kind``): ``"dynamic"`` (columns by
    decreasing Hessian diagonal, groups formed in that order: a non-monotone ``g_idx``),
    ``"static"`` (the same column order, groups fixed beforehand: no ``g_idx``; what
    compressed-tensors calls ``actorder "weight"``) and ``"off"``. ``static_groups=None``
    means auto, resolved on construction from the format's ``ACT_ORDER`` (dynamic for gptq,
    whose clients load a non-monotone ``g_idx``, and marlin; static for awq and
    compressed-tensors, which cannot store or no longer read one); ``replace`` resolves an
    auto value again for the new options.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 0
    sym: bool | None = None
    format: str = "gptq"
    gptq_version: int = 0  # 0 = auto: v1 for symmetric, v2 for asymmetric
    # calibration
    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    # GPTQ
    act_order: bool = True
    static_groups: bool | None = None  # None = auto: the format's ACT_ORDER (see act_order_kind)
    true_sequential: bool = True
    damp: float = 0.01
    block_size: int = 128
    # group ranges (rtn, gptq, awq-gptq): min-max, or the MSE-best shrink on a grid
    scale_search: str = "minmax"
    scale_grid: int = 25
    scale_max_shrink: float = 0.25
    # AWQ
    awq_grid: int = 20
    awq_clip: bool = True
    awq_search_tokens: int = 0  # 0 = auto: see resolve_awq_search_tokens
    awq_save_search: str | None = None  # write the AWQ search results (scales, clip bounds) here
    awq_load_search: str | None = None  # apply these search results instead of searching
    # sign-gradient rounding (qtool.signround): signed-gradient steps per block
    rounding_steps: int = 200
    # mixture-of-experts: an expert with fewer routed calibration tokens gets moe_low_tokens
    # ("all-experts": statistics from every token; "rtn"), see qtool.models.moe
    moe_min_tokens: int = 32
    moe_low_tokens: str = "all-experts"
    # fnmatch patterns on full module names of linears to keep in float (--exclude)
    exclude: tuple[str, ...] = ()
    # mixed precision (--bits-budget, qtool.budget): average bits per quantized weight,
    # scales and zeros included, that the per-layer widths must meet (0 = off); the widths
    # chosen are ``layer_bits``: (full module name, bits) of the linears not at ``bits``
    bits_budget: float = 0.0
    layer_bits: tuple[tuple[str, int], ...] = ()
    version: int = field(default=CONFIG_VERSION)
    _auto_groups: bool = field(default=False, init=False, repr=False, compare=False)  # static_groups was None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "layer_bits", tuple((str(n), int(b)) for n, b in self.layer_bits))
        if self.method not in METHODS:
            raise UserInputError(f"unknown --method '{self.method}': use one of {', '.join(METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise UserInputError(f"--bits {self.bits} is not supported: use 4 or 8")
        if self.group_size not in (0, *SUPPORTED_GROUP_SIZES):
            raise UserInputError(
                f"--group-size {self.group_size} is not supported: use one of -1, 32, 64, 128 (or omit it for auto)"
            )
        if self.nsamples < 1 or self.seqlen < 8:
            raise UserInputError("--nsamples must be >= 1 and --seqlen >= 8")
        if self.batch_size < 1:
            raise UserInputError("--batch-size must be >= 1")
        if self.gptq_version not in (0, 1, 2):
            raise UserInputError("--gptq-version must be 1 or 2")
        if not 0 < self.damp < 1:
            raise UserInputError(f"--damp {self.damp} must be in (0, 1); 0.01 is the usual value")
        if self.block_size < 1:
            raise UserInputError("--block-size must be >= 1")
        if self.awq_grid < 1:
            raise UserInputError("--awq-grid must be >= 1")
        if self.awq_search_tokens < 0:
            raise UserInputError("--awq-search-tokens must be >= 1 (or 0 for auto)")
        if self.awq_search_tokens and self.method not in AWQ_METHODS:
            raise UserInputError("--awq-search-tokens only applies to --method awq or awq-gptq")
        if self.scale_search not in SCALE_SEARCHES:
            raise UserInputError(f"unknown --scale-search '{self.scale_search}': use minmax or mse")
        if self.scale_grid < 1 or not 0 < self.scale_max_shrink < 1:
            raise UserInputError("--scale-grid must be >= 1 and --scale-max-shrink in (0, 1); 25 and 0.25 are the defaults")
        if self.scale_search == "mse" and self.method == "awq":
            raise UserInputError("--scale-search mse does not apply to --method awq (its clip search already shrinks "
                                 "each group's range): use --method awq-gptq or gptq with it, or drop it")
        if self.scale_search == "mse" and self.method == "rtn":
            raise UserInputError("--scale-search mse is not offered with --method rtn: on the built-in model it "
                                 "rounds worse than min-max (WikiText-2 ppl 30.52 vs 29.07, README 'Methods'); "
                                 "use it with --method gptq or awq-gptq, or drop it")
        if self.scale_search != "mse" and (self.scale_grid, self.scale_max_shrink) != (25, 0.25):
            raise UserInputError("--scale-grid/--scale-max-shrink only apply with --scale-search mse")
        if self.rounding_steps < 1:
            raise UserInputError("--rounding-steps must be >= 1 (200 is the default)")
        if self.rounding_steps != 200 and self.method != "signround":
            raise UserInputError("--rounding-steps only applies to --method signround")
        if (self.awq_save_search or self.awq_load_search) and self.method != "awq":
            raise UserInputError("--save-search/--load-search only apply to --method awq")
        if self.awq_load_search and not Path(self.awq_load_search).is_file():
            raise UserInputError(f"--load-search {self.awq_load_search} does not exist: pass a file written by --save-search")
        if self.moe_min_tokens < 1:
            raise UserInputError("--moe-min-tokens must be >= 1")
        if self.moe_low_tokens not in ("all-experts", "rtn"):
            raise UserInputError(f"unknown --moe-low-tokens '{self.moe_low_tokens}': use all-experts or rtn")
        if self.static_groups and self.method not in GPTQ_METHODS:
            raise UserInputError("--static-groups only applies to --method gptq or awq-gptq")
        if self.bits_budget or self.layer_bits:
            self._check_mixed()
        if self.static_groups is None:
            object.__setattr__(self, "_auto_groups", True)
            object.__setattr__(self, "static_groups", self.method in GPTQ_METHODS and self.act_order
                               and _format_act_order(self.format) == "static")

    def _check_mixed(self) -> None:
        """Per-layer widths: RTN or GPTQ, a format whose config states them, 4-bit base."""
        what = "--bits-budget" if self.bits_budget else "per-layer bits"
        if self.method not in MIXED_METHODS:
            raise UserInputError(f"{what} does not apply to --method {self.method}: use one of "
                                 f"{', '.join(MIXED_METHODS)}")
        if self.format not in MIXED_FORMATS:
            raise UserInputError(f"--format {self.format} cannot state per-layer bit widths: use --format "
                                 "compressed-tensors (config groups) or gptq (its 'dynamic' overrides) with "
                                 f"{what}")
        if self.bits != min(SUPPORTED_BITS):
            raise UserInputError(f"{what} chooses between --bits {min(SUPPORTED_BITS)} and wider layers: "
                                 f"use --bits {min(SUPPORTED_BITS)} with it")
        if self.bits_budget and not 0 < self.bits_budget <= 32:
            raise UserInputError(f"--bits-budget {self.bits_budget}: give average bits per weight, e.g. 4.5")
        bad = [(n, b) for n, b in self.layer_bits if b not in SUPPORTED_BITS]
        if bad:
            raise UserInputError(f"per-layer bits {bad[0][1]} for {bad[0][0]} is not supported: use 4 or 8")

    def bits_for(self, name: str) -> int:
        """The bit width of the linear with full module name ``name``."""
        for n, b in self.layer_bits:
            if n == name:
                return b
        return self.bits

    @property
    def symmetric(self) -> bool:
        if self.sym is not None:
            return self.sym
        return self.method not in AWQ_METHODS

    @property
    def uses_act_order(self) -> bool:
        """Whether the checkpoint carries a non-trivial g_idx (GPTQ act-order without
        static groups, and only with more than one group)."""
        return self.method in GPTQ_METHODS and self.act_order and not self.static_groups and self.group_size != -1

    @property
    def act_order_kind(self) -> str:
        """``"dynamic"``, ``"static"`` or ``"off"`` (see the class docstring); ``"off"`` for
        methods other than GPTQ."""
        if self.method not in GPTQ_METHODS or not self.act_order:
            return "off"
        return "static" if self.static_groups else "dynamic"

    @property
    def resolved_gptq_version(self) -> int:
        if self.gptq_version:
            return self.gptq_version
        return 1 if self.symmetric else 2

    def replace(self, **changes) -> "QuantizeConfig":
        if self._auto_groups and "static_groups" not in changes:
            changes = {**changes, "static_groups": None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["_auto_groups"]
        d["sym"] = self.symmetric
        d["act_order_kind"] = self.act_order_kind
        return d


def option_defaults() -> dict:
    """Every option's default in ``to_dict``'s JSON form, for the options that have a plain
    default: a resumed run compares an option missing from an older run's fingerprint (one
    added since) with its default, the behaviour that run had without it."""
    return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(QuantizeConfig)
                                  if f.default is not dataclasses.MISSING and not f.name.startswith("_")}))


def _format_act_order(name: str) -> str:
    """The act-order kind format ``name`` writes by default: its module's ``ACT_ORDER``."""
    from qtool.pack import get_format

    return get_format(name).ACT_ORDER


AWQ_MIN_SEARCH_TOKENS = 4096


def resolve_awq_search_tokens(config: QuantizeConfig, in_features: dict[str, int]) -> QuantizeConfig:
    """Fix ``awq_search_tokens`` (0 = auto) against the model's layers.

    The AWQ scale and clip searches score candidates with ``X^T X`` over the search
    tokens; with fewer tokens than a linear's ``k`` that matrix is rank-deficient and the
    search sees only part of the input space. Auto therefore takes
    ``max(4096, 2 * max k)`` tokens (4096 = 8 x 512 for every model up to k = 2048; e.g.
    22016 for a 7B model's down_proj with k = 11008). An explicit value is kept as given;
    when fewer tokens than ``k`` are available the method regularises the Gram matrix
    (``qtool.awq.stats.regularised_gram``). Other methods keep 0.
    """
    if config.method not in AWQ_METHODS or config.awq_search_tokens:
        return config
    return config.replace(awq_search_tokens=max(AWQ_MIN_SEARCH_TOKENS, 2 * max(in_features.values(), default=0)))


def resolve_group_size(config: QuantizeConfig, in_features: dict[str, int]) -> QuantizeConfig:
    """Fix ``group_size`` against the model's layers (``name -> in_features``).

    Auto picks the largest of 128/64/32 dividing every layer. An explicit size that does
    not divide some layer is an error naming those layers and the sizes that would work.
    """
    if config.group_size == -1:
        return config
    workable = [g for g in GROUP_SIZE_CANDIDATES if all(k % g == 0 for k in in_features.values())]
    if config.group_size == 0:
        if not workable:
            raise UserInputError(
                "no group size of 128/64/32 divides every layer's in_features; use --group-size -1 (per channel)"
            )
        return config.replace(group_size=workable[0])
    bad = {name: k for name, k in in_features.items() if k % config.group_size}
    if bad:
        shown = ", ".join(f"{n} (in_features={k})" for n, k in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        options = ", ".join(str(g) for g in [*workable, -1])
        raise UserInputError(
            f"--group-size {config.group_size} does not divide {shown}{more}; group sizes that work for this model: {options}"
        )
    return config
