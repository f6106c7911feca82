"""Initial weights that do not depend on how the model is laid out.

Every parameter has an *init rule*, kept by the module that owns it
(:func:`set_init`, so that it survives ``copy.deepcopy``; parameters of
``torch.nn`` modules without one get torch's own default, :func:`default_rule`), and
:func:`init_parameters` draws each parameter's full value from a generator
keyed by the seed and the parameter's canonical name — an expert tensor (first
dim = expert, :class:`PerExpert`) one expert at a time, keyed by the global
expert index too. A value therefore never depends on the order parameters are
built in, on the world size, on ``ep_size`` (a rank holding experts 4..7
draws exactly experts 4..7) or on whether the model was built whole on one
process or on the meta device and materialised partition by partition under
ZeRO-3 (docs/parallelism.md, "Construction"). Draws run on the host in float32,
so they are bitwise the same on every machine; the value is then cast and moved.

The project's modules mark their ``__init__`` with :func:`initialised`: the
outermost one built (the model, or a component built on its own) draws its
parameters once its construction is done; nested ones leave that to it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import nn

_RULES_ATTR = "_init_rules"


@dataclass(frozen=True)
class Constant:
    """Every element ``value``."""

    value: float = 0.0

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.full(shape, float(self.value))


@dataclass(frozen=True)
class Normal:
    """N(0, std²)."""

    std: float

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, self.std, generator=gen)


@dataclass(frozen=True)
class TruncNormal:
    """N(0, std²) truncated to ±``bound`` standard deviations."""

    std: float
    bound: float = 2.0

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        edge = self.bound * self.std
        return nn.init.trunc_normal_(torch.empty(shape), std=self.std, a=-edge, b=edge,
                                     generator=gen)


@dataclass(frozen=True)
class Uniform:
    """U(-bound, bound)."""

    bound: float

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.empty(shape).uniform_(-self.bound, self.bound, generator=gen)


@dataclass(frozen=True)
class XavierNormal:
    """Xavier (Glorot) normal, std = gain · sqrt(2 / (fan_in + fan_out)) (torch's fans)."""

    gain: float = 1.0

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return nn.init.xavier_normal_(torch.empty(shape), gain=self.gain, generator=gen)


@dataclass(frozen=True)
class KaimingNormal:
    """Kaiming (He) normal for a ReLU-like activation, fan-in: std = sqrt(2 / fan_in)."""

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return nn.init.kaiming_normal_(torch.empty(shape), nonlinearity="relu", generator=gen)


@dataclass(frozen=True)
class Orthogonal:
    """A (semi-)orthogonal matrix (Saxe et al.), as ``nn.init.orthogonal_``. Its QR runs on
    one thread: a multi-threaded LAPACK rounds differently with another thread count."""

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return nn.init.orthogonal_(torch.empty(shape), generator=gen)
        finally:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class Chunks:
    """Dim 0 cut into ``len(parts)`` equal chunks, chunk i drawn by ``parts[i]`` (in turn,
    from the one generator): e.g. an LSTM's four stacked gates."""

    parts: tuple

    def draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        if shape[0] % len(self.parts):
            raise ValueError(f"{len(self.parts)} chunks do not divide dim 0 of {shape}")
        rows = shape[0] // len(self.parts)
        return torch.cat([part.draw((rows,) + tuple(shape[1:]), gen) for part in self.parts])


@dataclass(frozen=True)
class PerExpert:
    """An expert tensor: dim 0 indexes experts ``offset, offset + 1, ...``, each drawn by
    ``inner`` from its own generator keyed by the global expert index, so that a rank
    holding a slice of the experts draws exactly that slice."""

    inner: Rule
    offset: int = 0

    def sliced(self, start: int) -> PerExpert:
        """The rule of this tensor's experts ``[start, ...)``."""
        return replace(self, offset=self.offset + start)


Rule = Union[Constant, Normal, TruncNormal, Uniform, XavierNormal, KaimingNormal,
             Orthogonal, Chunks, PerExpert]


def set_init(module: nn.Module, name: str, rule: Rule) -> None:
    """The init rule of ``module``'s own parameter ``name`` (read by :func:`init_parameters`)."""
    module.__dict__.setdefault(_RULES_ATTR, {})[name] = rule


def new_parameter(module: nn.Module, name: str, like: torch.Tensor, rule: Rule) -> nn.Parameter:
    """Register a parameter shaped like ``like`` as ``module.<name>`` with init ``rule``
    (its value comes from :func:`init_parameters`); returns it."""
    param = nn.Parameter(like)
    module.register_parameter(name, param)
    set_init(module, name, rule)
    return param


def expert_slice(module: nn.Module, name: str, start: int, stop: int) -> nn.Parameter:
    """Replace ``module``'s expert tensor ``name`` by a new parameter holding experts
    ``[start, stop)`` (its attributes kept, its rule shifted to those experts); returns it."""
    full = getattr(module, name)
    rule = module.__dict__.get(_RULES_ATTR, {}).get(name)
    if not isinstance(rule, PerExpert):
        raise TypeError(f"{type(module).__name__}.{name} is not an expert tensor "
                        f"(its init rule is {rule!r})")
    local = nn.Parameter(full.detach()[start:stop].clone(), requires_grad=full.requires_grad)
    local.__dict__.update(full.__dict__)
    setattr(module, name, local)
    set_init(module, name, rule.sliced(start))
    return local


def buffer_device() -> Optional[torch.device]:
    """Where a buffer derived from the config is built: the default device, but the host
    when that is the meta device (nothing gives a buffer its values later)."""
    return torch.device("cpu") if torch.get_default_device().type == "meta" else None


def _fan_in(shape: torch.Size) -> int:
    return shape[1] * math.prod(shape[2:]) if len(shape) > 1 else shape[0]


def default_rule(module: nn.Module, name: str, param: nn.Parameter) -> Rule:
    """torch's own initialisation of a ``torch.nn`` module's parameter, as a rule:
    Linear / Conv1d ``kaiming_uniform_(a=√5)`` and the matching bias bound, LayerNorm
    1 / 0, Embedding N(0, 1), LSTM U(±1/√hidden). Raises for anything else, so
    that a parameter of the project's own modules never goes without a rule."""
    if isinstance(module, nn.LayerNorm):
        return Constant(1.0 if name == "weight" else 0.0)
    if isinstance(module, nn.Embedding):
        return Normal(1.0)
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        return Uniform(1.0 / math.sqrt(_fan_in(module.weight.shape)))
    if isinstance(module, nn.LSTM):
        return Uniform(1.0 / math.sqrt(module.hidden_size))
    raise TypeError(f"parameter {name!r} of {type(module).__name__} has no init rule "
                    "(liquid_dist.model.init.set_init)")


def rule_of(module: nn.Module, name: str, param: nn.Parameter) -> Rule:
    """The init rule of ``module``'s own parameter ``name``."""
    return module.__dict__.get(_RULES_ATTR, {}).get(name) or default_rule(module, name, param)


def generator_for(seed: int, name: str, expert: Optional[int] = None) -> torch.Generator:
    """A host generator keyed by (seed, canonical parameter name[, global expert index])."""
    key = f"{seed}/{name}" + ("" if expert is None else f"/expert{expert}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw(rule: Rule, shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """The float32 host value of parameter ``name`` (shape ``shape``) under ``rule``."""
    if isinstance(rule, PerExpert):
        return torch.stack([rule.inner.draw(tuple(shape[1:]), generator_for(seed, name, e))
                            for e in range(rule.offset, rule.offset + shape[0])])
    return rule.draw(tuple(shape), generator_for(seed, name))


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix, module


Source = Callable[[str, nn.Parameter, Rule], torch.Tensor]
"""(canonical name, parameter, its rule) -> its value (a pretrained file's tensor, say; the
rule says which experts an expert tensor holds)."""


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int, *, source: Optional[Source] = None,
                    device: Union[str, torch.device, None] = None,
                    dtype: Optional[torch.dtype] = None,
                    after_module: Optional[Callable[[nn.Module], None]] = None) -> None:
    """Give every parameter of ``model`` its value: ``source(name, param, rule)`` when given,
    otherwise the draw of its rule keyed by ``seed`` and its canonical name.

    Modules are visited children first; each parameter is valued once (a tied
    one under its first name in ``model.named_parameters()``), one tensor at a
    time, then ``after_module(module)`` runs on the module whose own parameters
    were just valued (ZeRO-3's partitioning, say), so that a rank never holds
    more than its partitions plus the module being valued. A parameter on the
    meta device is replaced by a real one (same attributes, ties kept); any
    other is written in place. ``device`` / ``dtype``: where and in what the
    values go (default: the parameter's own, the host for a meta one).
    """
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    done: dict[int, nn.Parameter] = {}
    for _, module in _post_order(model):
        valued = False
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in done:  # a tie to a parameter valued earlier
                module._parameters[attr] = done[id(p)]
                continue
            name = names[id(p)]
            rule = rule_of(module, attr, p)
            value = (source(name, p, rule) if source is not None
                     else draw(rule, tuple(p.shape), seed, name))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: value of shape {tuple(value.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
            target_device = device if device is not None else (
                "cpu" if p.is_meta else p.device)
            value = value.to(device=target_device, dtype=dtype or p.dtype)
            if p.is_meta:
                new = nn.Parameter(value, requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                module._parameters[attr] = new
                done[id(p)] = done[id(new)] = new
            else:
                p.copy_(value)
                done[id(p)] = p
            valued = True
        for attr, b in module._buffers.items():
            if b is not None and b.is_meta:
                raise ValueError(f"buffer {attr!r} of {type(module).__name__} is on the meta "
                                 "device: derived buffers are built on the host")
            if b is not None and device is not None:
                module._buffers[attr] = b.to(device)
        if valued and after_module is not None:
            after_module(module)


_building = threading.local()


def initialised(init: Callable) -> Callable:
    """Decorate a module's ``__init__``: when it is the outermost module being built
    (not a component built inside another decorated module), draw its parameters on
    return (:func:`init_parameters`) with the ``seed`` argument of ``__init__`` if it
    has one and it is not None, else a seed taken from torch's global generator (so
    ``torch.manual_seed`` decides). Nothing is drawn for a module built on the meta
    device: whoever materialises it gives the values."""
    signature = inspect.signature(init)
    takes_seed = "seed" in signature.parameters

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        depth = getattr(_building, "depth", 0)
        _building.depth = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _building.depth = depth
        if depth or any(p.is_meta for p in self.parameters()):
            return
        seed = None
        if takes_seed:
            seed = signature.bind(self, *args, **kwargs).arguments.get("seed")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        init_parameters(self, seed)

    return wrapper
