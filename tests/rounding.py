"""Checking a ratio a bench prints against the rounded numbers it prints beside it."""


def follows_from_rounded(ratio: float, numerator: float, denominator: float, value_half_unit: float = 0.005) -> bool:
    """Whether a printed 2-decimal ``ratio`` lies between the ratios that the printed ``numerator`` and
    ``denominator`` (each rounded to ``2 * value_half_unit``) allow."""
    low = (numerator - value_half_unit) / (denominator + value_half_unit)
    high = (numerator + value_half_unit) / max(denominator - value_half_unit, 1e-9)
    return low - 0.005 <= ratio <= high + 0.005
