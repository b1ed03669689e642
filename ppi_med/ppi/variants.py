"""One grammar for PPI variants: a spec read into :class:`PPIConfig` fields, and a configuration's label.

A spec is ``<name>[:<field>=<value>,<field>=<value>...]``:

* ``<name>`` is ``baseline`` (PPI off), ``random_erasing`` (PPI off, random erasing with p 0.5),
  ``random_mask`` (PPI with every removed region moved to a random place), ``ppi`` (PPI on), or
  ``ppi_<saliency>[_<mask>][_<guide>][_<fill>][_<control>]`` (PPI on with those fields set, e.g. ``ppi_wbp``,
  ``ppi_wbp_box``, ``ppi_wbp_partner_zero``, ``ppi_gradcam_random_mask``);
* each ``<field>=<value>`` sets any other :class:`PPIConfig` field (``ppi:mode=detached,partner=roll``). A value
  is read by the field's type: ``true``/``false`` for switches, numbers, ``none`` for an unset optional field,
  JSON for lists and mappings (``contrast_classes=[1]``; commas inside brackets do not separate fields).

Fields a spec does not set come from a base configuration (:class:`PPIConfig`'s defaults, or a study's own,
e.g. a bundle's ``ppi``). :func:`variant_label` writes a configuration back as the spec of the fields in which it
differs from the base, in one canonical spelling: the name carries saliency, mask, guide, fill and control, the
list every other differing field in :class:`PPIConfig`'s order. So two enabled configurations that differ in any
field get different labels, ``variant(variant_label(cfg, base), base) == cfg``, and the default configuration is
``ppi_wbp``. With PPI off only ``random_erasing`` acts, and only it is written (``baseline``, ``random_erasing``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any

from ..flags import as_bool
from ..saliency import METHODS as SALIENCIES
from .interventions import FILLS
from .masks import MASKS
from .objective import CONTROLS, GUIDES, PPIConfig

__all__ = [
    "NAMED",
    "NAME_PARTS",
    "RECIPE_FIELDS",
    "VariantError",
    "parse_value",
    "recipe_label",
    "render_value",
    "split_fields",
    "variant",
    "variant_fields",
    "variant_label",
]

#: the names that stand for fixed fields (the baseline and the two controls of docs/DESIGN.md section 4.5)
NAMED: dict[str, dict[str, Any]] = {
    "baseline": {"enabled": False},
    "random_erasing": {"enabled": False, "random_erasing": 0.5},
    "random_mask": {"enabled": True, "control": "random_mask"},
}
#: the fields written into a ``ppi_<saliency>`` name, in the order they follow it, with their values
NAME_PARTS: dict[str, tuple[str, ...]] = {"mask": MASKS, "guide": GUIDES, "fill": FILLS, "control": CONTROLS}
#: fields a training recipe sets from its own length and task (a bundle's epochs, its positive class), so that
#: :attr:`PPIConfig.method` names the variant on its recipe rather than the recipe too
RECIPE_FIELDS = ("contrast_classes", "adversarial_classes", "warmup_epochs", "ramp_epochs")

_TYPES = {f.name: str(f.type) for f in fields(PPIConfig)}


class VariantError(ValueError):
    """A PPI variant spec that cannot be read, named with the offending part."""


def _grammar(saliencies: Sequence[str]) -> str:
    return (
        "use baseline, random_erasing, random_mask, ppi or ppi_<saliency>[_<mask>][_<guide>][_<fill>][_<control>], "
        "optionally followed by :<field>=<value>,... (e.g. ppi_wbp, ppi_wbp_box, ppi:mode=detached,partner=roll), "
        f"with saliency one of {', '.join(saliencies)}, mask one of {', '.join(MASKS)}, guide one of "
        f"{', '.join(GUIDES)}, fill one of {', '.join(FILLS)}, control one of {', '.join(CONTROLS)}"
    )


def split_fields(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes (``a=[0,1],b=2`` -> ``a=[0,1]``, ``b=2``)."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_value(name: str, value: Any) -> Any:
    """A field's value as :class:`PPIConfig` holds it, read from a spec's text by the field's type.

    Args:
        name: the :class:`PPIConfig` field.
        value: its text in a spec, or a value already (a float field's integer becomes a float).

    Raises:
        VariantError: an unknown field, or a value that is not of the field's type.
    """
    if name not in _TYPES:
        raise VariantError(f"unknown PPI field '{name}': the fields are {', '.join(_TYPES)}")
    kind = _TYPES[name]
    optional = kind.endswith("| None")
    base = kind.removesuffix("| None").strip()
    if not isinstance(value, str):
        if base == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            return as_bool(text, f"PPI {name}")
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "str":
            return text
        parsed = json.loads(text)
    except ValueError as err:
        raise VariantError(f"PPI field {name}={text}: not a {base} ({err})") from None
    want = list if base.startswith("list") else dict
    if not isinstance(parsed, want):
        raise VariantError(f"PPI field {name}={text}: not a {base}")
    return parsed


def render_value(name: str, value: Any) -> str:
    """A field's value as a spec writes it (the inverse of :func:`parse_value`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if _TYPES.get(name) == "float":
        return repr(float(value))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _name_fields(name: str, saliencies: Sequence[str]) -> dict[str, Any] | None:
    """The fields a name stands for, or ``None`` for a name that is none of the grammar's."""
    if name in NAMED:
        return dict(NAMED[name])
    if name == "ppi":
        return {"enabled": True}
    rest = name.removeprefix("ppi_") if name.startswith("ppi_") else None
    for saliency in sorted(saliencies, key=len, reverse=True):  # input_x_gradient before gradient
        if rest is None or not (rest == saliency or rest.startswith(saliency + "_")):
            continue
        out: dict[str, Any] = {"enabled": True, "saliency": saliency}
        tail = rest[len(saliency) + 1 :]
        for part in reversed(NAME_PARTS):  # control, fill, guide, mask: the order they are read from the end
            for value in sorted(NAME_PARTS[part], key=len, reverse=True):  # soft_adaptive before soft
                if tail == value or tail.endswith("_" + value):
                    out[part], tail = value, tail[: len(tail) - len(value)].rstrip("_")
                    break
        if not tail:
            return out
    return None


def variant_fields(spec: str | Mapping[str, Any], saliencies: Sequence[str] = SALIENCIES) -> dict[str, Any]:
    """The :class:`PPIConfig` fields a spec sets (the others come from the base configuration).

    Args:
        spec: a spec of the grammar (module docstring), or a mapping of field names to values.
        saliencies: the saliency method names a ``ppi_<saliency>`` name may use.

    Returns:
        ``{field: value}`` with values of the fields' types.

    Raises:
        VariantError: an unknown name, field or saliency, a malformed item, a value of the wrong type, a field set
            twice, or fields after ``baseline`` (PPI off: its fields do nothing).
    """
    if isinstance(spec, Mapping):
        out = {str(k): parse_value(str(k), v) for k, v in spec.items()}
    else:
        name, colon, rest = spec.strip().partition(":")
        named = _name_fields(name, saliencies)
        if named is None:
            raise VariantError(f"unknown method '{spec}': {_grammar(saliencies)}")
        items = split_fields(rest)
        if colon and not items:
            raise VariantError(f"PPI variant '{spec}': nothing after ':'; write <field>=<value>,...")
        out = named
        fixed = set(named) - {"random_erasing"}  # random_erasing:random_erasing=<p> gives another probability
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise VariantError(f"PPI variant '{spec}': '{item}' is not <field>=<value>")
            if key in fixed:
                raise VariantError(f"PPI variant '{spec}': {key} is set twice (by the name or the list)")
            fixed.add(key)
            try:
                out[key] = parse_value(key, value)
            except VariantError as err:
                raise VariantError(f"PPI variant '{spec}': {err}") from None
        allowed = {"baseline": {"enabled"}, "random_erasing": {"enabled", "random_erasing"}}.get(name)
        extra = sorted(set(out) - allowed) if allowed is not None else []
        if extra:
            raise VariantError(
                f"PPI variant '{spec}': {name} trains without PPI, so {', '.join(extra)} would do nothing"
                + (" (only random_erasing=<p> may follow it)" if name == "random_erasing" else "")
            )
    if "saliency" in out and out["saliency"] not in saliencies:
        raise VariantError(f"PPI variant '{spec}': saliency must be one of {', '.join(saliencies)}")
    return out


def _as_config(base: PPIConfig | Mapping[str, Any] | None) -> PPIConfig:
    if base is None:
        return PPIConfig()
    if isinstance(base, PPIConfig):
        return base
    return PPIConfig(**{k: parse_value(k, v) for k, v in base.items()})


def variant(
    spec: str | Mapping[str, Any],
    base: PPIConfig | Mapping[str, Any] | None = None,
    saliencies: Sequence[str] = SALIENCIES,
) -> PPIConfig:
    """The configuration a spec names: the base with the spec's fields set.

    Args:
        spec: a spec of the grammar (``ppi``, ``ppi_wbp_box``, ``ppi:mode=detached,partner=roll``) or a mapping
            of fields.
        base: the configuration the spec changes (:class:`PPIConfig`'s defaults when ``None``; a mapping is read
            as its fields).
        saliencies: the saliency method names a ``ppi_<saliency>`` name may use.

    Raises:
        VariantError: a spec :func:`variant_fields` refuses, or fields the configuration refuses (the spec named).
    """
    set_fields = variant_fields(spec, saliencies)
    try:
        return PPIConfig(**{**asdict(_as_config(base)), **set_fields})
    except (TypeError, ValueError) as err:
        raise VariantError(f"PPI variant '{spec}': {err}") from None


def variant_label(cfg: PPIConfig, base: PPIConfig | Mapping[str, Any] | None = None) -> str:
    """The canonical spec of ``cfg`` on ``base``: the fields in which it differs, in one spelling.

    Args:
        cfg: the configuration.
        base: what it is read against (:class:`PPIConfig`'s defaults when ``None``).

    Returns:
        ``baseline``, ``random_erasing`` (``random_erasing:random_erasing=<p>`` for another probability), or
        ``ppi_<saliency>`` with ``_<part>`` for each of mask, guide, fill and control that differs from the base
        (``random_mask`` for the base's saliency and parts with the control on), then ``:<field>=<value>,...``
        for every other differing field in :class:`PPIConfig`'s order: ``ppi_wbp``, ``ppi_wbp_box``,
        ``ppi_wbp:mode=detached``, ``ppi_wbp_partner_zero:partner=roll``.
    """
    ref = _as_config(base)
    if not cfg.enabled:
        p = cfg.random_erasing
        if not p or p == 0.5:
            return "random_erasing" if p else "baseline"
        return f"random_erasing:random_erasing={render_value('random_erasing', p)}"
    parts = [p for p in NAME_PARTS if getattr(cfg, p) != getattr(ref, p)]
    if parts == ["control"] and cfg.control == "random_mask" and cfg.saliency == ref.saliency:
        name = "random_mask"
    else:
        name = "_".join([f"ppi_{cfg.saliency}", *(str(getattr(cfg, p)) for p in parts)])
    skip = {"enabled", "saliency", *NAME_PARTS}
    items = [
        f"{f.name}={render_value(f.name, getattr(cfg, f.name))}"
        for f in fields(PPIConfig)
        if f.name not in skip and getattr(cfg, f.name) != getattr(ref, f.name)
    ]
    return name + (":" + ",".join(items) if items else "")


def recipe_label(cfg: PPIConfig) -> str:
    """The label of ``cfg`` on its own recipe: :data:`RECIPE_FIELDS` as ``cfg`` has them, the rest default.

    What :attr:`PPIConfig.method` returns: a bundle's warm-up of half its epochs and its positive class are the
    recipe's, not the variant's, so the GA bundle's default configuration is ``ppi_wbp``.
    """
    return variant_label(cfg, PPIConfig(**{f: getattr(cfg, f) for f in RECIPE_FIELDS}))
