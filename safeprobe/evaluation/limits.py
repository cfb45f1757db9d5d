"""`limit`: how many prompts of each suite are answered: all of them, a number for every suite, or per suite.

Written `50` (the first 50 of every suite), `sst2=200` (200 of SST-2, every other suite whole) or
`50,sst2=200,advbench=all` (a bare number for the suites not named). Harmful suites are worth answering whole
(small suites overstate differences) while a long task suite, which only bounds accuracy, can be sampled.
A number stays a number, so settings written before per-suite limits keep their hashes.
"""
from __future__ import annotations

from ..errors import UserError

ALL = "all"


def parse_limit(value, where: str = "limit") -> int | str | None:
    """The canonical form of a limit: None (all), an int (every suite) or 'N,suite=N' text, suites sorted."""
    default, per_suite = _parts(value, where)
    if not per_suite:
        return default
    items = [] if default is None else [str(default)]
    items += [f"{suite}={ALL if n is None else n}" for suite, n in sorted(per_suite.items())]
    return ",".join(items)


def suite_limit(limit, suite: str) -> int | None:
    """How many prompts of `suite` a (canonical or raw) limit takes; None: all."""
    default, per_suite = _parts(limit, "limit")
    return per_suite.get(suite, default)


def check_limit_suites(limit, suites, where: str = "limit") -> None:
    """A limit that names a suite not evaluated is a typo: it would silently limit nothing."""
    unknown = sorted(set(_parts(limit, where)[1]) - set(suites))
    if unknown:
        raise UserError(f"{where}: names suite(s) {', '.join(unknown)}, which are not evaluated "
                        f"({', '.join(suites)})")


def restrict_limit(limit, suites):
    """The limit with only the per-suite counts of `suites` (for an evaluation of fewer suites)."""
    default, per_suite = _parts(limit, "limit")
    kept = [f"{suite}={ALL if n is None else n}" for suite, n in per_suite.items() if suite in suites]
    return parse_limit(",".join([*([] if default is None else [str(default)]), *kept]) or None)


def describe_limit(limit) -> str:
    """A limit in words, for reports: '50 prompts per suite', 'every prompt, sst2: 200'."""
    default, per_suite = _parts(limit, "limit")
    head = "every prompt of each suite" if default is None else f"{default} prompts per suite"
    rest = [f"{suite}: {ALL if n is None else n}" for suite, n in sorted(per_suite.items())]
    return ", ".join([head, *rest])


def _parts(value, where: str) -> tuple[int | None, dict[str, int | None]]:
    if value is None:
        return None, {}
    if isinstance(value, int) and not isinstance(value, bool):
        return _count(value, where), {}
    default, per_suite = None, {}
    for item in (part.strip() for part in str(value).split(",")):
        if not item:
            continue
        suite, _, count = item.rpartition("=")
        number = _count(count.strip(), where)
        if suite.strip():
            per_suite[suite.strip()] = number
        else:
            default = number
    return default, per_suite


def _count(text, where: str) -> int | None:
    if isinstance(text, str) and text.lower() in (ALL, "none"):
        return None
    try:
        number = int(text)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a number of prompts, 'all', or suite=number items "
                        f"(e.g. 50,sst2=200), got {text!r}") from None
    if number < 1:
        raise UserError(f"{where} must be >= 1, got {number}")
    return number
