"""How a model's test videos are sampled, resized, cropped and normalised: :class:`Preprocessing`.

A checkpoint record stores these entries (``model.json``'s ``preprocessing``), a run's results
file keeps the ones it was measured with, and a config or the command line may override them.
:class:`Preprocessing` is their one form in memory, checked once when it is built; its fields
are the entries (:data:`PREPROCESSING_FIELDS`) and :meth:`Preprocessing.to_dict` their JSON
form. ``ModelRecord.resolve_preprocessing`` fills it from a record; the input protocols
(``vtm_jax.data.protocols``) read it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from vtm_jax.errors import UserError

PROTOCOLS = ("paper", "scenic", "centred")
PAPER_LOADERS = ("kinetics", "ssv2", "epic_kitchens")
SAMPLINGS = ("stride", "segments")  # the centred protocol's temporal sampling

# Entries only one protocol reads; the JSON form leaves them out under the others.
_PROTOCOL_ONLY = {"paper_loader": "paper", "is_test_split": "scenic"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The input pipeline a model is fed with (``vtm_jax.data.protocols`` applies it).

    ``num_frames`` frames per clip, ``stride`` frames apart (or, with ``sampling='segments'``,
    the middle frames of equal segments), the short side resized to ``min_resize``, square
    ``crop_size`` crops, per-channel ``mean`` and ``std`` on pixels scaled to [0, 1]. The
    ``protocol`` picks the frames and crops; ``paper_loader`` is the ``paper`` protocol's
    dataset loader (default ``kinetics``) and ``is_test_split`` whether Scenic's pipeline runs
    on its multi-view ``test`` split (default true). Every entry is checked when built: a bad
    one fails before any video is read.
    """

    num_frames: int
    stride: int
    min_resize: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sampling: str = "stride"
    # Checkpoints written before protocols existed were measured with vtm-jax 0.1's own.
    protocol: str = "centred"
    paper_loader: str | None = None
    is_test_split: bool | None = None

    def __post_init__(self) -> None:
        for key in NORMALISATION_FIELDS:
            check_normalisation(key, getattr(self, key), where="preprocessing")
            object.__setattr__(self, key, tuple(float(v) for v in getattr(self, key)))
        for key in INTEGER_FIELDS:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"preprocessing {key} must be a positive integer, not {value!r}")
        for key in ("protocol", "sampling", "paper_loader"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, str(getattr(self, key)))
        if self.is_test_split is not None:
            object.__setattr__(self, "is_test_split", bool(self.is_test_split))
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol {self.protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if self.paper_loader is not None and self.paper_loader not in PAPER_LOADERS:
            raise UserError(
                f"unknown paper_loader {self.paper_loader!r}; valid: {', '.join(PAPER_LOADERS)}"
            )
        if self.sampling not in SAMPLINGS:
            raise UserError(f"unknown sampling {self.sampling!r}; valid: {', '.join(SAMPLINGS)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """The preprocessing a dict of entries describes (None: the entry's default)."""
        check_names(values)
        given = {k: v for k, v in values.items() if v is not None}
        missing = [k for k in REQUIRED_FIELDS if k not in given]
        if missing:
            raise UserError(f"preprocessing lacks {', '.join(missing)}")
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (records, results files): plain numbers and lists, in field order,
        without the entries that are unset or that the protocol does not read."""
        out: dict[str, Any] = {}
        for name in PREPROCESSING_FIELDS:
            value = getattr(self, name)
            if value is None or _PROTOCOL_ONLY.get(name, self.protocol) != self.protocol:
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


_FIELDS = dataclasses.fields(Preprocessing)
# The entries, in their JSON order: the one list of them.
PREPROCESSING_FIELDS = tuple(f.name for f in _FIELDS)
# The entries without a default: a record or a config must give them.
REQUIRED_FIELDS = tuple(f.name for f in _FIELDS if f.default is dataclasses.MISSING)
INTEGER_FIELDS = tuple(f.name for f in _FIELDS if f.type in ("int", int))
NORMALISATION_FIELDS = tuple(f.name for f in _FIELDS if f.type.startswith("tuple[float"))


def check_names(values: Mapping[str, Any]) -> None:
    """A UserError naming the entries of ``values`` that are no preprocessing entry."""
    unknown = sorted(set(values) - set(PREPROCESSING_FIELDS))
    if unknown:
        raise UserError(
            f"unknown preprocessing entries {', '.join(unknown)}; "
            f"valid: {', '.join(PREPROCESSING_FIELDS)}"
        )


def check_normalisation(key: str, values: Any, *, where: str) -> None:
    """``mean`` or ``std`` must be 3 finite numbers, one per RGB channel (std > 0)."""
    try:
        ok = len(values) == 3 and all(math.isfinite(float(v)) for v in values)
        ok = ok and (key != "std" or min(float(v) for v in values) > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{where} {key} must be 3 finite numbers (std > 0), not {values!r}")
