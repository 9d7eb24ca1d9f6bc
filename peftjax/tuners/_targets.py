"""Which modules a PEFT config selects, with Hugging Face PEFT's rules.

Module names are paths as in transformers (``model.layers.0.self_attn.q_proj``), so a
``target_modules`` list written for PEFT selects the same layers here:
- a string is a regex that must match the whole name;
- a list matches a name equal to an entry or ending in ``"." + entry``;
- ``"all-linear"`` is every linear layer except the output / classification head;
- ``layers_to_transform`` keeps names whose layer index (the number after ``layers_pattern``,
  or after the first ``<name>.<digits>.`` when no pattern is given) is listed;
- ``exclude_modules`` and ``modules_to_save`` remove names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from flax import nnx

from peftjax.models._layers import Linear

HEAD_NAMES = ("lm_head", "score", "classifier")


def named_modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """(dotted name, module) for every submodule, in graph order; the root is skipped."""
    for path, node in nnx.iter_graph(model):
        if path and isinstance(node, nnx.Module) and not isinstance(node, (nnx.List, nnx.Dict)):
            yield ".".join(map(str, path)), node


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _listed(name: str, entries) -> bool:
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return name in entries or any(name.endswith("." + e) for e in entries)


def is_target(name: str, *, target_modules, exclude_modules=None, modules_to_save=None,
              layers_to_transform=None, layers_pattern=None) -> bool:
    if exclude_modules and _listed(name, exclude_modules):
        return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
        return False
    if not _listed(name, target_modules):
        return False
    if layers_to_transform is not None and not isinstance(target_modules, str):
        wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        if len(wanted):
            return layer_index(name, layers_pattern) in wanted
    return True


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` that matches ``name`` (PEFT's rule:
    the key matches a dotted suffix of the name, as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def find_targets(model: nnx.Module, config) -> list[str]:
    """Names of the linear layers ``config`` selects; raises when it selects none."""
    linears = [n for n, m in named_modules(model) if isinstance(m, Linear)]
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = [n for n in linears if n.split(".")[0] not in HEAD_NAMES]
    found = [n for n in linears if is_target(
        n, target_modules=targets, exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save,
        layers_to_transform=getattr(config, "layers_to_transform", None),
        layers_pattern=getattr(config, "layers_pattern", None))]
    if not found:
        suffixes = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(
            f"target_modules={config.target_modules!r} (layers_to_transform="
            f"{getattr(config, 'layers_to_transform', None)!r}, exclude_modules="
            f"{config.exclude_modules!r}) matches no "
            f"linear layer of {type(model).__name__}. Its linear layers are named {suffixes} "
            f"(e.g. {linears[0] if linears else 'none'}); use those names, a regex matching full "
            "names, or 'all-linear'.")
    return found


def get_submodule(model: nnx.Module, name: str) -> nnx.Module:
    node = model
    for p in name.split(".") if name else ():
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    return node


def set_submodule(model: nnx.Module, name: str, new: nnx.Module) -> None:
    parent_name, _, last = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)
