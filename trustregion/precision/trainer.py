"""How the per-model precision settings meet Lightning's ``trainer.precision``.

The policy trains under ``trainer.precision``: ``32-true`` (fp32), ``bf16-mixed`` (fp32
weights, bf16 autocast matmuls; log-probabilities are always taken in fp32) or ``bf16-true`` /
``16-true`` (every weight in that dtype); ``16-mixed`` is refused (:data:`TRAINER_PRECISIONS`).
The behaviour and reference models compute at their own precision, outside the trainer's
autocast.

A ``*-true`` precision makes Lightning cast every floating-point tensor of the module — the
behaviour and reference models included — to its dtype, so those models can only hold that
dtype: their precision must be that dtype, or a quantised format (int8, nf4, fp8, whose weights
keep their format) computing in it. :func:`check_trainer_precision` refuses anything else
before the first rollout.
"""

from __future__ import annotations

from trustregion.precision.settings import QUANTIZED_PRECISIONS, PrecisionSettings

__all__ = ["CASTING_PRECISIONS", "TRAINER_PRECISIONS", "check_trainer_precision",
           "precision_summary"]

TRAINER_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
"""The values of ``trainer.precision`` a run may use. ``16-mixed`` is not one: its gradient
scaler unscales the gradients only inside the optimiser step, after the module has clipped them
by their norm (it optimises manually), so clipping, the logged norm and overflow handling would
all see gradients scaled by 2¹⁶."""

CASTING_PRECISIONS = {"bf16-true": "bf16", "16-true": "fp16"}
"""``trainer.precision`` values that cast the whole module, with the format they cast to."""

_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}

_FORMATS = {
    "fp32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
    "int8": "int8 (bitsandbytes Linear8bitLt)",
    "nf4": "nf4 (bitsandbytes Linear4bit)",
    "fp8": "fp8 (e4m3 weights, per-row scales)",
}


def _normalised(trainer_precision: str) -> str:
    return _ALIASES.get(trainer_precision, trainer_precision)


def check_trainer_precision(trainer_precision: str, settings: PrecisionSettings, *,
                            has_reference: bool) -> None:
    """Refuse a ``trainer.precision`` the module cannot train under, and a casting one
    (``bf16-true``, ``16-true``) that would change the behaviour's or the reference's
    precision (module docstring).

    >>> check_trainer_precision("bf16-true", PrecisionSettings(behavior="bf16"),
    ...                         has_reference=False)
    >>> check_trainer_precision("bf16-true", PrecisionSettings(),
    ...                         has_reference=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: trainer.precision='bf16-true' casts ... precision.behavior='fp32' cannot hold; ...
    """
    given = _normalised(trainer_precision)
    if given == "16-mixed":
        raise ValueError(
            "trainer.precision='16-mixed' is not supported: its gradient scaler unscales the "
            "gradients only inside the optimiser step, after trustregion clips them by their "
            "norm; use trainer.precision='bf16-mixed' (or '16-true' for fp16 weights)")
    if given not in TRAINER_PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {', '.join(TRAINER_PRECISIONS)} "
                         f"with trustregion; got {trainer_precision!r}")
    cast_to = CASTING_PRECISIONS.get(given)
    if cast_to is None:
        return
    models = [("behavior", settings.behavior)]
    if has_reference:
        models.append(("reference", settings.reference))
    for name, precision in models:
        holds = (precision == cast_to if precision not in QUANTIZED_PRECISIONS
                 else settings.compute == cast_to)
        if not holds:
            mixed = given.replace("-true", "-mixed")
            quantised = ", ".join(repr(p) for p in QUANTIZED_PRECISIONS)
            raise ValueError(
                f"trainer.precision={trainer_precision!r} casts every model of the module to "
                f"{cast_to}, so precision.{name}={precision!r}"
                + (f" with precision.compute={settings.compute!r}"
                   if precision in QUANTIZED_PRECISIONS else "")
                + f" cannot hold; set precision.{name} to {cast_to!r} or to a quantised format "
                f"({quantised}) with precision.compute={cast_to!r}, or train with "
                f"trainer.precision={mixed!r}")


def precision_summary(trainer_precision: str, settings: PrecisionSettings, *,
                      has_reference: bool, fp8_paths: str | None) -> str:
    """The one line a run logs at start: each model's precision and, for FP8, how its matmuls
    run on this device (``fp8_paths``, from
    :func:`~trustregion.precision.describe_fp8_paths`).

    >>> precision_summary("bf16-mixed", PrecisionSettings(behavior="int8"),
    ...                   has_reference=False, fp8_paths=None)
    'precision: policy bf16-mixed; behaviour int8 (bitsandbytes Linear8bitLt), computing in bf16'
    """
    policy = _normalised(trainer_precision)
    if settings.policy == "fp8":
        policy += " with torchao float8 Linear layers"
    parts = [f"policy {policy}", "behaviour " + _described(settings.behavior, settings)]
    if has_reference:
        parts.append("reference " + _described(settings.reference, settings))
    line = "precision: " + "; ".join(parts)
    return line if fp8_paths is None else f"{line}; {fp8_paths}"


def _described(precision: str, settings: PrecisionSettings) -> str:
    text = _FORMATS[precision]
    if precision in QUANTIZED_PRECISIONS:
        text += f", computing in {settings.compute}"
    return text
