"""The search space: a YAML file, validated with line numbers, defined through KerasTuner's `hp`.

KerasTuner's `hp` interface (`Choice/Int/Float/Boolean/Fixed`, `conditional_scope`) is the
vocabulary of the space, so one `define(hp, space)` serves every engine: KerasTuner's own
`HyperParameters`, or an Optuna trial wrapped in `OptunaHP`.

The file format is documented at the top of `search_spaces/default.yaml`. In short:

    backbones:                      # which backbones to search, each with its own parameters
      MobileNetV2: {input_size: [96, 160, 224], alpha: [0.5, 1.0], freeze_block: [0, 16]}
    hyperparameters:                # shared by every backbone (names are TrialParams fields)
      dense_units: {choice: [64, 128, 256]}
      dropout: {float: [0.0, 0.6], step: 0.1}
      l2: {float: [1.0e-6, 1.0e-2], sampling: log}
      label_smoothing: 0.1          # a plain value is fixed

Per-backbone parameters are named `"<Backbone>/input_size"`, `"<Backbone>/alpha"` and
`"<Backbone>/freeze_block"`, so each name always has one distribution (Optuna refuses a name
whose choices change between trials) and KerasTuner sees them as conditional on `backbone`.
Hyperparameters the file leaves out are `hp.Fixed` at the `TrialParams` default, so every
trial's recorded values describe the whole configuration.
"""
from __future__ import annotations

import difflib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .config import TrialParams
from .errors import SpaceError, UsageError

# Parameters that belong to one backbone (set under `backbones:`), in definition order.
BACKBONE_PARAMS = ("input_size", "alpha", "freeze_block")
# Everything else a TrialParams holds, in TrialParams' field order: the fixed order of definition.
GLOBAL_PARAMS = tuple(
    f.name for f in fields(TrialParams) if f.name != "backbone" and f.name not in BACKBONE_PARAMS
)
_DEFAULTS = TrialParams()
# Python type each global parameter must have (from its TrialParams default).
_TYPES = {name: type(getattr(_DEFAULTS, name)) for name in GLOBAL_PARAMS}
# Sanity bounds beyond TrialParams' own checks: (low, high, low_inclusive, high_inclusive).
_BOUNDS = {
    "dense_units": (0, None, True, True),
    "dropout": (0.0, 1.0, True, False),
    "l2": (0.0, None, True, True),
    "label_smoothing": (0.0, 1.0, True, False),
    "lr_stage1": (0.0, None, False, True),
    "lr_stage2": (0.0, None, False, True),
    "augment": (0.0, 1.0, True, True),
    "batch_size": (1, None, True, True),
}
KINDS = ("choice", "int", "float", "bool", "fixed")
# Keys each kind accepts besides its own.
_KIND_KEYS = {"choice": {"default"}, "bool": {"default"}, "fixed": set(),
              "int": {"step", "sampling", "default"}, "float": {"step", "sampling", "default"}}
_TOP_KEYS = ("backbones", "hyperparameters")


@dataclass(frozen=True)
class ParamSpec:
    """One global hyperparameter: its kind and domain, and the line it came from."""

    name: str
    kind: str  # "choice" | "int" | "float" | "bool" | "fixed"
    values: tuple = ()  # choice values, (False, True) for bool, (value,) for fixed
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    sampling: str = "linear"  # "linear" | "log"
    default: Any = None
    line: int = 0


@dataclass(frozen=True)
class BackboneSpace:
    """One backbone and the values of its own parameters (canonical name, allowed by the registry)."""

    name: str
    input_size: tuple[int, ...]
    alpha: tuple[float, ...]  # empty: the backbone has no width multiplier
    freeze_block: tuple[int, int]  # (min, max) block index, inclusive
    line: int = 0
    default_input_size: int | None = None  # first value a fresh KerasTuner hp takes
    default_alpha: float | None = None


@dataclass(frozen=True)
class SearchSpace:
    """A validated space; `backbones` keeps the file's order (the first is the default)."""

    backbones: dict[str, BackboneSpace]
    params: dict[str, ParamSpec]
    source: str


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_space(path, backbones: list[str] | None = None) -> SearchSpace:
    """Read and validate a space file; `backbones` (any case) keeps only those backbones.

    Every problem is a one-line `SpaceError`: `file:line: key.path: what is wrong`.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"{source}: search-space file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"{source}: cannot read the search-space file: {exc}") from None
    space = _Reader(source).read(text)
    if backbones:
        space = _restrict(space, backbones)
    return space


def _restrict(space: SearchSpace, names: list[str]) -> SearchSpace:
    from . import backbones as registry

    kept = {}
    for name in names:
        try:
            canonical = registry.get(name).name
        except UsageError as exc:
            raise UsageError(f"--backbones {name}: {exc}") from None
        if canonical not in space.backbones:
            raise SpaceError(
                f"{space.source}: backbone {name!r} is not in this search space "
                f"(it has {', '.join(space.backbones)}); add it to the file or pick another"
            )
        kept[canonical] = space.backbones[canonical]
    ordered = {n: b for n, b in space.backbones.items() if n in kept}
    return SearchSpace(backbones=ordered, params=space.params, source=space.source)


class _Reader:
    """Walks the composed YAML node tree so every error can name its line and key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = yaml.SafeLoader("")

    def error(self, node, keypath: str, message: str) -> SpaceError:
        line = node.start_mark.line + 1 if node is not None else 1
        where = f"{keypath}: " if keypath else ""
        return SpaceError(f"{self.source}:{line}: {where}{message}")

    # -- the document --------------------------------------------------------------------

    def read(self, text: str) -> SearchSpace:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            problem = exc.problem or exc.context or "invalid YAML"
            context = ""
            if exc.context and exc.context_mark and exc.problem:
                context = f" ({exc.context} at line {exc.context_mark.line + 1})"
            raise SpaceError(f"{self.source}:{line}: YAML syntax error: {problem}{context}") from None
        except yaml.YAMLError as exc:
            raise SpaceError(f"{self.source}:1: YAML error: {exc}") from None
        if root is None:
            raise SpaceError(f"{self.source}:1: the file is empty; it needs a `backbones:` section")
        top = self.mapping(root, "")
        for key, (knode, _) in top.items():
            if key not in _TOP_KEYS:
                raise self.error(
                    knode, key,
                    f"unknown top-level key; {_did_you_mean(key, _TOP_KEYS)}"
                    f"expected one of {', '.join(_TOP_KEYS)}",
                )
        if "backbones" not in top:
            raise self.error(root, "backbones", "missing; list at least one backbone to search")
        bnode = top["backbones"][1]
        backbones = self.read_backbones(bnode)
        params = {}
        if "hyperparameters" in top and not _is_null(top["hyperparameters"][1]):
            hnode = top["hyperparameters"][1]
            for name, (knode, vnode) in self.mapping(hnode, "hyperparameters").items():
                params[name] = self.read_param(name, knode, vnode)
        # Fixed order, whatever the file's order: the order of definition is part of the space.
        params = {name: params[name] for name in GLOBAL_PARAMS if name in params}
        return SearchSpace(backbones=backbones, params=params, source=self.source)

    # -- backbones -------------------------------------------------------------------------

    def read_backbones(self, node) -> dict[str, BackboneSpace]:
        from . import backbones as registry

        entries = self.mapping(node, "backbones")
        if not entries:
            raise self.error(node, "backbones", "empty; list at least one backbone to search")
        result: dict[str, BackboneSpace] = {}
        for name, (knode, vnode) in entries.items():
            path = f"backbones.{name}"
            try:
                spec = registry.get(name)
            except UsageError:
                known = registry.names()
                raise self.error(
                    knode, path,
                    f"unknown backbone; {_did_you_mean(name, known)}choose from {', '.join(known)}",
                ) from None
            if spec.name in result:
                raise self.error(knode, path, f"{spec.name} is listed twice; keep one entry")
            keys = {} if _is_null(vnode) else self.mapping(vnode, path)
            for key, (kn, _) in keys.items():
                if key not in BACKBONE_PARAMS:
                    raise self.error(
                        kn, f"{path}.{key}",
                        f"unknown backbone parameter; expected {', '.join(BACKBONE_PARAMS)} "
                        "(shared hyperparameters go under `hyperparameters:`)",
                    )
            result[spec.name] = self.read_backbone(spec, path, knode, keys)
        return result

    def read_backbone(self, spec, path: str, knode, keys: dict) -> BackboneSpace:
        sizes = (spec.default_size,)
        if "input_size" in keys:
            vnode = keys["input_size"][1]
            sizes = self.list_of(vnode, f"{path}.input_size", int)
            for value, item in zip(sizes, self.items(vnode)):
                if value not in spec.sizes:
                    allowed = ", ".join(str(s) for s in spec.sizes)
                    raise self.error(
                        item, f"{path}.input_size",
                        f"{value} is not an input size {spec.name} supports; use {allowed}",
                    )
        alphas = (spec.default_alpha,) if spec.alphas else ()
        if "alpha" in keys:
            vnode = keys["alpha"][1]
            if not spec.alphas:
                raise self.error(
                    vnode, f"{path}.alpha", f"{spec.name} has no width multiplier; remove `alpha`"
                )
            alphas = self.list_of(vnode, f"{path}.alpha", float)
            for value, item in zip(alphas, self.items(vnode)):
                if not any(math.isclose(value, a) for a in spec.alphas):
                    allowed = ", ".join(str(a) for a in spec.alphas)
                    raise self.error(
                        item, f"{path}.alpha",
                        f"{value} is not an alpha {spec.name} supports; use {allowed}",
                    )
            alphas = tuple(next(a for a in spec.alphas if math.isclose(v, a)) for v in alphas)
        freeze = (0, 0)
        if "freeze_block" in keys:
            freeze = self.read_freeze(spec, f"{path}.freeze_block", keys["freeze_block"][1])
        default_size = spec.default_size if spec.default_size in sizes else sizes[0]
        default_alpha = None
        if alphas:
            default_alpha = spec.default_alpha if spec.default_alpha in alphas else alphas[0]
        return BackboneSpace(
            name=spec.name, input_size=sizes, alpha=alphas, freeze_block=freeze,
            line=knode.start_mark.line + 1,
            default_input_size=default_size, default_alpha=default_alpha,
        )

    def read_freeze(self, spec, path: str, node) -> tuple[int, int]:
        if isinstance(node, yaml.ScalarNode):
            low = high = self.number(node, path, int)
        else:
            items = self.items(node, path)
            if len(items) not in (1, 2):  # [12] fixes it, like input_size: [96]
                raise self.error(node, path, f"expected [min, max] block indices (an inclusive "
                                 f"range, e.g. [0, 8]) or one index (e.g. 12), got {len(items)}")
            bounds = [self.number(n, f"{path}[{i}]", int) for i, n in enumerate(items)]
            low, high = bounds[0], bounds[-1]
        if low < 0:
            raise self.error(node, path, f"min {low} is negative; 0 means the whole backbone trains")
        if low > high:
            raise self.error(node, path, f"min {low} > max {high}; write [{high}, {low}]")
        count = _freeze_point_count(spec)
        if count is not None and high > count:
            raise self.error(
                node, path, f"max {high} is past {spec.name}'s last freeze point ({count}); lower it"
            )
        return (low, high)

    # -- global hyperparameters ------------------------------------------------------------

    def read_param(self, name: str, knode, vnode) -> ParamSpec:
        path = f"hyperparameters.{name}"
        if name in BACKBONE_PARAMS or name == "backbone":
            raise self.error(
                knode, path, f"`{name}` is set per backbone; move it under backbones.<name>"
            )
        if name not in GLOBAL_PARAMS:
            raise self.error(
                knode, path,
                f"unknown hyperparameter; {_did_you_mean(name, GLOBAL_PARAMS)}"
                f"expected one of {', '.join(GLOBAL_PARAMS)}",
            )
        line = knode.start_mark.line + 1
        kind_type = _TYPES[name]
        if isinstance(vnode, (yaml.ScalarNode, yaml.SequenceNode)) and not _is_null(vnode):
            if isinstance(vnode, yaml.SequenceNode):
                raise self.error(
                    vnode, path, "a list is ambiguous; write {choice: [...]} or {float: [min, max]}"
                )
            value = self.number(vnode, path, kind_type)
            self.check_bounds(name, value, vnode, path)
            return ParamSpec(name, "fixed", values=(value,), default=value, line=line)
        entry = self.mapping(vnode, path)
        kinds = [k for k in entry if k in KINDS]
        if len(kinds) != 1:
            raise self.error(
                vnode, path, f"expected exactly one of {', '.join(KINDS)} (e.g. {{choice: [1, 2]}})"
            )
        kind = kinds[0]
        allowed = _KIND_KEYS[kind]
        for key, (kn, _) in entry.items():
            if key != kind and key not in allowed:
                extra = f"; {kind} accepts {', '.join(sorted(allowed))}" if allowed else ""
                raise self.error(kn, f"{path}.{key}", f"unknown key for {kind}{extra}")
        knode_kind, domain = entry[kind]
        kpath = f"{path}.{kind}"
        if kind == "fixed":
            value = self.number(domain, kpath, kind_type)
            self.check_bounds(name, value, domain, kpath)
            return ParamSpec(name, "fixed", values=(value,), default=value, line=line)
        if kind == "bool":
            if kind_type is not bool:
                raise self.error(knode_kind, kpath, f"{name} is a number, not a boolean")
            values = tuple(self.scalar(n) for n in self.items(domain, kpath))
            if sorted(values) != [False, True] or not all(isinstance(v, bool) for v in values):
                raise self.error(domain, kpath, "expected [false, true]")
            default = self.default(entry, path, lambda n, p: self.boolean(n, p), values)
            return ParamSpec(name, "bool", values=(False, True), default=default, line=line)
        if kind == "choice":
            values = self.list_of(domain, kpath, kind_type)
            for value, item in zip(values, self.items(domain)):
                self.check_bounds(name, value, item, kpath)
            default = self.default(entry, path, lambda n, p: self.number(n, p, kind_type), values)
            return ParamSpec(name, "choice", values=values, default=default, line=line)
        return self.read_range(name, kind, kind_type, entry, path, line)

    def read_range(self, name, kind, kind_type, entry, path, line) -> ParamSpec:
        knode, domain = entry[kind]
        kpath = f"{path}.{kind}"
        if kind == "int" and kind_type is not int:
            raise self.error(knode, kpath, f"{name} is a float; write `float: [min, max]`")
        if kind == "float" and kind_type is not float:
            raise self.error(knode, kpath, f"{name} is an integer; write `int: [min, max]`")
        items = self.items(domain, kpath)
        if len(items) != 2:
            raise self.error(domain, kpath, "expected [min, max]")
        low, high = (self.number(n, f"{kpath}[{i}]", kind_type) for i, n in enumerate(items))
        for value, item in zip((low, high), items):
            self.check_bounds(name, value, item, kpath)
        if low > high:
            raise self.error(domain, kpath, f"min {low} > max {high}; write [{high}, {low}]")
        sampling = "linear"
        if "sampling" in entry:
            snode = entry["sampling"][1]
            sampling = self.scalar(snode)
            if not isinstance(sampling, str) or sampling not in ("linear", "log"):
                raise self.error(snode, f"{path}.sampling",
                                 f"expected linear or log, got {_describe(snode)}")
            if sampling == "log" and low <= 0:
                raise self.error(
                    snode, f"{path}.sampling", f"log sampling needs min > 0, got {low}; raise min"
                )
        step = None
        if "step" in entry:
            snode = entry["step"][1]
            step = self.number(snode, f"{path}.step", kind_type)
            if sampling == "log":
                if step <= 1:
                    raise self.error(
                        snode, f"{path}.step",
                        f"with log sampling step is a factor and must be > 1, got {step}",
                    )
            elif step <= 0:
                raise self.error(snode, f"{path}.step", f"must be > 0, got {step}")
            elif high > low and not _is_multiple(high - low, step):
                raise self.error(
                    snode, f"{path}.step", f"max - min ({high} - {low}) is not a multiple of step {step}"
                )
        spec = ParamSpec(name, kind, min=low, max=high, step=step, sampling=sampling, line=line)

        def read_default(node, p):
            value = self.number(node, p, kind_type)
            if not low <= value <= high:
                raise self.error(node, p, f"{value} is outside [{low}, {high}]")
            if step and sampling == "linear" and not _is_multiple(value - low, step):
                raise self.error(node, p, f"{value} is not on the grid {low} + k * {step}")
            if step and sampling == "log":
                grid = _log_grid(low, high, step, kind_type)
                near = [g for g in grid if math.isclose(g, value, rel_tol=1e-9)]
                if not near:
                    raise self.error(node, p, f"{value:g} is not on the grid {low:g} * {step:g}**k "
                                              f"({', '.join(f'{g:g}' for g in grid)})")
                return near[0]
            return value

        return replace(spec, default=self.default(entry, path, read_default, None))

    def default(self, entry, path, read, values):
        if "default" not in entry:
            return None
        node = entry["default"][1]
        value = read(node, f"{path}.default")
        if values is not None and value not in values:
            raise self.error(node, f"{path}.default", f"{value!r} is not one of the values listed")
        return value

    def check_bounds(self, name, value, node, path) -> None:
        low, high, low_in, high_in = _BOUNDS[name]
        too_low = low is not None and (value < low or (value == low and not low_in))
        too_high = high is not None and (value > high or (value == high and not high_in))
        if too_low or too_high:
            lo = "(-inf" if low is None else ("[" if low_in else "(") + str(low)
            hi = "inf)" if high is None else str(high) + ("]" if high_in else ")")
            raise self.error(node, path, f"{value} is out of range for {name}; must be in {lo}, {hi}")
        try:
            TrialParams(**{name: value})
        except UsageError as exc:
            raise self.error(node, path, str(exc)) from None

    # -- node helpers ----------------------------------------------------------------------

    def mapping(self, node, path: str) -> dict:
        """{key: (key_node, value_node)}; refuses non-mappings, non-string and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            what = path or "the file"
            raise self.error(
                node, path, f"expected a mapping (key: value) for {what}, got {_describe(node)}"
            )
        result = {}
        for knode, vnode in node.value:
            key = self.scalar(knode) if isinstance(knode, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise self.error(knode, path, f"keys must be names, got {_describe(knode)}")
            if key in result:
                first = result[key][0].start_mark.line + 1
                raise self.error(knode, sub, f"duplicate key (first at line {first})")
            result[key] = (knode, vnode)
        return result

    def items(self, node, path: str = "") -> list:
        """The nodes of a sequence; a single scalar counts as a one-item list."""
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.ScalarNode) and not _is_null(node):
            return [node]
        raise self.error(node, path, f"expected a list, got {_describe(node)}")

    def list_of(self, node, path: str, kind: type) -> tuple:
        items = self.items(node, path)
        if not items:
            raise self.error(node, path, "empty list; give at least one value")
        values = tuple(self.number(item, path, kind) for item in items)
        if len(set(values)) != len(values):
            raise self.error(node, path, "has duplicate values; list each once")
        return values

    def scalar(self, node):
        if not isinstance(node, yaml.ScalarNode):
            return node
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError):
            # A tag the safe loader does not know (`!foo`) or cannot apply (`!!int x`).
            raise self.error(node, "", f"cannot read {node.value!r} tagged {node.tag}; remove "
                             "the tag") from None

    def boolean(self, node, path):
        value = self.scalar(node)
        if not isinstance(value, bool):
            raise self.error(node, path, f"expected true or false, got {_describe(node)}")
        return value

    def number(self, node, path: str, kind: type):
        """An int or float (ints widen to float).

        Plain `1e-6` counts as a number, though YAML 1.1 reads it as a string.
        """
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, path, f"expected a number, got {_describe(node)}")
        value = self.scalar(node)
        if isinstance(value, str) and node.style is None:
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            expected = "an integer" if kind is int else "a number"
            raise self.error(node, path, f"expected {expected}, got {_describe(node)}")
        if not math.isfinite(value):
            raise self.error(node, path, f"expected a finite number, got {node.value!r}")
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise self.error(node, path, f"expected an integer, got {node.value!r}")
                value = int(value)
            return value
        return float(value)


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _describe(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "nothing"
    return repr(node.value)


def _is_multiple(span: float, step: float) -> bool:
    ratio = span / step
    return math.isclose(ratio, round(ratio), rel_tol=1e-9, abs_tol=1e-9)


def _freeze_point_count(spec) -> int | None:
    """The backbone's number of freeze points (`backbones.FREEZE_POINT_COUNTS`)."""
    from .backbones import FREEZE_POINT_COUNTS

    return FREEZE_POINT_COUNTS.get(spec.name)


# --------------------------------------------------------------------------------------------
# Defining a trial
# --------------------------------------------------------------------------------------------


def define(hp, space: SearchSpace) -> TrialParams:
    """Declare the space on `hp` and return this trial's concrete `TrialParams`.

    Every backbone's parameters are declared (inactive ones return None), so KerasTuner's
    oracle learns the whole conditional space on the first call; only the chosen backbone's
    values are read. The order of calls is fixed, which keeps seeded samplers reproducible.
    """
    names = list(space.backbones)
    backbone = hp.Choice("backbone", names, default=names[0])
    chosen: dict[str, Any] = {}
    for name, entry in space.backbones.items():
        with hp.conditional_scope("backbone", [name]):
            size = _pick(hp, f"{name}/input_size", entry.input_size, entry.default_input_size)
            alpha = None
            if entry.alpha:
                alpha = _pick(hp, f"{name}/alpha", entry.alpha, entry.default_alpha)
            freeze = _int_range(hp, f"{name}/freeze_block", *entry.freeze_block)
        values = {"input_size": size, "alpha": alpha, "freeze_block": freeze}
        if name == backbone:
            chosen = values
    if backbone not in space.backbones or chosen.get("input_size") is None:
        raise SpaceError(
            f"{space.source}: backbone {backbone!r} is not in this search space "
            f"({', '.join(names)}); use a space that lists it"
        )
    params: dict[str, Any] = {"backbone": backbone, **chosen}
    for name in GLOBAL_PARAMS:
        spec = space.params.get(name)
        value = hp.Fixed(name, getattr(_DEFAULTS, name)) if spec is None else _suggest(hp, spec)
        params[name] = _TYPES[name](value)
    if params["alpha"] is not None:
        params["alpha"] = float(params["alpha"])
    params["input_size"] = int(params["input_size"])
    params["freeze_block"] = int(params["freeze_block"])
    return TrialParams(**params)


def _pick(hp, name: str, values: tuple, default):
    """A choice, or `hp.Fixed` for a single value (no dimension for the sampler to waste)."""
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    return hp.Choice(name, list(values), default=default)


def _int_range(hp, name: str, low: int, high: int):
    if low == high:
        return hp.Fixed(name, low)
    return hp.Int(name, low, high, default=low)


def _suggest(hp, spec: ParamSpec):
    if spec.kind == "fixed":
        return hp.Fixed(spec.name, spec.values[0])
    if spec.kind == "choice":
        if len(spec.values) == 1:
            return hp.Fixed(spec.name, spec.values[0])
        return hp.Choice(spec.name, list(spec.values), default=spec.default)
    if spec.kind == "bool":
        return hp.Boolean(spec.name, default=bool(spec.default))
    method = hp.Int if spec.kind == "int" else hp.Float
    return method(
        spec.name, spec.min, spec.max, step=spec.step, sampling=spec.sampling, default=spec.default
    )


def default_values(space: SearchSpace) -> dict:
    """The values a fresh KerasTuner `hp` takes (file defaults, first choices): e.g. for
    `optuna.Study.enqueue_trial`, so the first trial is the hand-tuned baseline."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    define(hp, space)
    return dict(hp.values)


# --------------------------------------------------------------------------------------------
# Optuna adapter
# --------------------------------------------------------------------------------------------


class OptunaHP:
    """KerasTuner's `hp` interface over an `optuna.trial.Trial` (or a `FrozenTrial`, to replay).

    Optuna is define-by-run, so `conditional_scope` only has to mirror KerasTuner's rule that a
    parameter in an inactive scope returns None: it is then never suggested, and Optuna stores
    only the chosen backbone's parameters. `values` holds every active value, fixed ones too.
    """

    def __init__(self, trial) -> None:
        self.trial = trial
        self.values: dict[str, Any] = {}
        self._conditions: list[tuple[str, list]] = []

    # -- scopes ------------------------------------------------------------------------------

    @contextmanager
    def conditional_scope(self, parent_name: str, parent_values):
        if parent_name not in self.values and not self._inactive():
            raise ValueError(f"`HyperParameter` named: {parent_name} not defined.")
        values = parent_values if isinstance(parent_values, (list, tuple, set)) else [parent_values]
        self._conditions.append((parent_name, list(values)))
        try:
            yield
        finally:
            self._conditions.pop()

    def _inactive(self) -> bool:
        return any(self.values.get(parent) not in values for parent, values in self._conditions)

    def _scope(self, parent_name, parent_values):
        if parent_name is None:
            return nullcontext()
        return self.conditional_scope(parent_name, parent_values)

    def _record(self, name: str, suggest):
        if self._inactive():
            return None
        value = suggest()
        self.values[name] = value
        return value

    # -- the hp interface --------------------------------------------------------------------

    def Choice(self, name, values, ordered=None, default=None,
               parent_name=None, parent_values=None, **_):
        with self._scope(parent_name, parent_values):
            return self._record(name, lambda: self.trial.suggest_categorical(name, list(values)))

    def Int(self, name, min_value, max_value, step=None, sampling="linear", default=None,
            parent_name=None, parent_values=None, **_):
        def suggest():
            if sampling == "log" and step not in (None, 1):
                return self.trial.suggest_categorical(name, _log_grid(min_value, max_value, step, int))
            return self.trial.suggest_int(
                name, min_value, max_value, step=step or 1, log=sampling == "log"
            )

        with self._scope(parent_name, parent_values):
            return self._record(name, suggest)

    def Float(self, name, min_value, max_value, step=None, sampling="linear", default=None,
              parent_name=None, parent_values=None, **_):
        """Optuna cannot combine `step` with `log`; KerasTuner then means a geometric grid
        (min, min*step, ...), which is suggested here as a categorical over that grid."""
        def suggest():
            if sampling == "log" and step:
                return self.trial.suggest_categorical(name, _log_grid(min_value, max_value, step, float))
            return self.trial.suggest_float(
                name, min_value, max_value, step=step, log=sampling == "log"
            )

        with self._scope(parent_name, parent_values):
            return self._record(name, suggest)

    def Boolean(self, name, default=False, parent_name=None, parent_values=None, **_):
        with self._scope(parent_name, parent_values):
            return self._record(name, lambda: self.trial.suggest_categorical(name, [False, True]))

    def Fixed(self, name, value, parent_name=None, parent_values=None, **_):
        with self._scope(parent_name, parent_values):
            return self._record(name, lambda: value)

    def get(self, name):
        if name not in self.values:
            raise KeyError(f"{name} does not exist or is inactive in this trial.")
        return self.values[name]

    def __getitem__(self, name):
        return self.get(name)

    def __contains__(self, name) -> bool:
        return name in self.values

    def is_active(self, name) -> bool:
        return name in self.values


def _log_grid(low, high, step, kind) -> list:
    """KerasTuner's log-with-step values: low * step**k up to high, rounded to 12 significant
    digits (1e-6 * 10**2 is 9.999999999999999e-05 in floating point; a default of 1e-4, or a
    value typed into a file, must be found among them)."""
    count = int(math.log(high / low, step) + 1e-8) + 1
    return [kind(float(f"{low * step**k:.12g}")) for k in range(count)]


# --------------------------------------------------------------------------------------------
# Stored parameters
# --------------------------------------------------------------------------------------------


def hp_from_params(params: dict):
    """A KerasTuner `HyperParameters` that makes `define()` return these stored values.

    Accepts either hp names (`"MobileNetV2/input_size"`) or a flat `params_to_row` dict
    (`input_size` with `backbone`); e.g. to retrain the best trial of a finished search.
    """
    import keras_tuner

    values = {}
    for name, value in params.items():
        value = value.item() if hasattr(value, "item") else value  # numpy/pandas scalars
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        values[name] = value
    backbone = values.get("backbone")
    for key in BACKBONE_PARAMS:
        if key in values and backbone is not None:
            values.setdefault(f"{backbone}/{key}", values.pop(key))
    hp = keras_tuner.HyperParameters()
    for name, value in values.items():
        hp.Fixed(name, value)
    return hp


def params_to_row(p: TrialParams) -> dict:
    """A flat dict (one column per TrialParams field, backbone first) for trials.csv."""
    return p.to_dict()
