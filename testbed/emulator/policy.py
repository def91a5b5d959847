"""Identity-based IAM policy evaluation as AWS documents it, for one request (pure: no moto).

A request is a list of checks; each check is (action, resource ARN, condition context). The
request is allowed only when every check is allowed. One check:

  * an explicit Deny that applies (action, resource and every condition match) denies;
  * otherwise an Allow that applies allows;
  * otherwise it is denied implicitly.

  https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html

"Applies" includes the conditions: an Allow whose condition does not hold simply does not apply
(moto 5 returns DENIED for it, which makes a least-privilege policy with a condition deny
everything). Resource-based policies, permission boundaries, SCPs and session policies are not
modelled: skiff uses none of them.

Policy variables (`${ec2:SourceInstanceARN}`, `${aws:username}`, with a default
`${key, 'value'}` and the literals `${*}`, `${?}`, `${$}`) are replaced from the check's context
in Resource and in the values of string and ARN conditions; a variable whose key the request
lacks (or has with several values) matches nothing, so that element does not apply.
  https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_variables.html
"""

from __future__ import annotations

import ast
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class Check:
    action: str  # "service:Action"
    resource: str  # an ARN, or "*" for actions without resource-level permissions
    context: dict[str, list[str]] = field(default_factory=dict)  # condition keys, any case


@dataclass
class Decision:
    allowed: bool
    denied_by: Check | None = None  # the first check that failed
    explicit: bool = False  # denied by an explicit Deny statement
    allowed_by: list[str] = field(default_factory=list)  # per check: the Sid (or #index) that allowed it


def parse_document(doc: Any) -> dict:
    """A policy document as moto stores it: JSON text, URL-encoded JSON, a Python repr (what
    moto keeps for CloudFormation inline policies) or a dict already."""
    if isinstance(doc, dict):
        return doc
    text = str(doc)
    for candidate in (text, urllib.parse.unquote(text)):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
    return ast.literal_eval(urllib.parse.unquote(text))


def statements(documents: Iterable[Any]) -> list[dict]:
    out = []
    for doc in documents:
        parsed = parse_document(doc)
        stmts = parsed.get("Statement", [])
        if isinstance(stmts, dict):
            stmts = [stmts]
        # An Fn::If that chose AWS::NoValue stays a null in moto; CloudFormation drops it.
        out.extend(s for s in stmts if s)
    return out


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_LITERALS = {"*": "*", "?": "?", "$": "$"}


def _segments(pattern: str, context: dict[str, list[str]] | None) -> list[tuple[bool, str]] | None:
    """The pattern cut at its policy variables: (literal, text) pairs, where a variable's value
    and ${*} ${?} ${$} are literal (no wildcard) and the rest is the policy's own text. None when
    a variable names a key the request lacks and gives no default."""
    out: list[tuple[bool, str]] = []
    at = 0
    for m in _VARIABLE.finditer(pattern):
        out.append((False, pattern[at:m.start()]))
        at = m.end()
        inner = m.group(1).strip()
        if inner in _LITERALS:
            out.append((True, _LITERALS[inner]))
            continue
        key, _, default = inner.partition(",")
        values = _lookup(context or {}, key.strip())
        if values is not None and len(values) == 1:
            out.append((True, values[0]))
        elif default.strip().startswith("'") and default.strip().endswith("'") and len(default.strip()) >= 2:
            out.append((True, default.strip()[1:-1]))
        else:
            return None
    out.append((False, pattern[at:]))
    return out


def _substitute(pattern: str, context: dict[str, list[str]] | None) -> str | None:
    """The pattern with its policy variables replaced, for exact comparisons."""
    segments = _segments(pattern, context)
    return None if segments is None else "".join(text for _, text in segments)


def _wildcard(pattern: str, value: str, ignore_case: bool, context: dict[str, list[str]] | None = None) -> bool:
    """IAM's wildcards: * any run of characters (also across ':' and '/'), ? one character;
    policy variables replaced from the context (their values match literally).
    https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_resource.html"""
    segments = _segments(pattern, context) if context is not None else [(False, pattern)]
    if segments is None:
        return False
    rx = "".join(re.escape(text) if literal else
                 "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)
                 for literal, text in segments)
    return re.fullmatch(rx, value, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL) is not None


def action_matches(stmt: dict, action: str) -> bool:
    # Action names are case-insensitive.
    # https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_action.html
    if "NotAction" in stmt:
        return not any(_wildcard(p, action, True) for p in _as_list(stmt["NotAction"]))
    return any(_wildcard(p, action, True) for p in _as_list(stmt.get("Action")))


def resource_matches(stmt: dict, resource: str, context: dict[str, list[str]] | None = None) -> bool:
    # ARNs are case-sensitive; "*" in a statement matches any resource, including "*".
    context = context or {}
    if "NotResource" in stmt:
        return not any(_wildcard(p, resource, False, context) for p in _as_list(stmt["NotResource"]))
    patterns = _as_list(stmt.get("Resource"))
    if resource == "*":
        # An action without resource-level permissions is only allowed by Resource "*".
        # https://docs.aws.amazon.com/service-authorization/latest/reference/reference_policies_actions-resources-contextkeys.html
        return "*" in patterns
    return any(_wildcard(p, resource, False, context) for p in patterns)


# --- conditions ------------------------------------------------------------------------------
# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition_operators.html
# https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_condition-single-vs-multi-valued-context-keys.html

# Each matcher takes the request's value, the policy's value and the context its variables come
# from.
def _str_eq(v, p, ctx):
    p = _substitute(p, ctx)
    return p is not None and v == p


def _str_eq_ic(v, p, ctx):
    p = _substitute(p, ctx)
    return p is not None and v.lower() == p.lower()


def _str_like(v, p, ctx):
    return _wildcard(p, v, False, ctx)


def _bool(v, p, _ctx):
    return v.lower() == str(p).lower()


def _num(op):
    def f(v, p, _ctx):
        try:
            return op(float(v), float(p))
        except ValueError:
            return False
    return f


# operator -> (value matcher, negated)
OPERATORS = {
    "StringEquals": (_str_eq, False),
    "StringNotEquals": (_str_eq, True),
    "StringEqualsIgnoreCase": (_str_eq_ic, False),
    "StringNotEqualsIgnoreCase": (_str_eq_ic, True),
    "StringLike": (_str_like, False),
    "StringNotLike": (_str_like, True),
    "ArnEquals": (_str_like, False),
    "ArnLike": (_str_like, False),
    "ArnNotEquals": (_str_like, True),
    "ArnNotLike": (_str_like, True),
    "Bool": (_bool, False),
    "NumericEquals": (_num(lambda a, b: a == b), False),
    "NumericNotEquals": (_num(lambda a, b: a == b), True),
    "NumericLessThan": (_num(lambda a, b: a < b), False),
    "NumericLessThanEquals": (_num(lambda a, b: a <= b), False),
    "NumericGreaterThan": (_num(lambda a, b: a > b), False),
    "NumericGreaterThanEquals": (_num(lambda a, b: a >= b), False),
}


class UnsupportedCondition(ValueError):
    pass


def _lookup(context: dict[str, list[str]], key: str) -> list[str] | None:
    # Condition key names are case-insensitive.
    # https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition.html
    lowered = key.lower()
    for k, v in context.items():
        if k.lower() == lowered:
            return v
    return None


def condition_holds(operator: str, key: str, wanted: Any, context: dict[str, list[str]]) -> bool:
    qualifier = None
    op = operator
    if ":" in op:
        qualifier, op = op.split(":", 1)
        if qualifier not in ("ForAllValues", "ForAnyValue"):
            raise UnsupportedCondition(f"condition qualifier {qualifier!r}")
    if_exists = op.endswith("IfExists")
    if if_exists:
        op = op[: -len("IfExists")]
    present = _lookup(context, key)
    policy_values = [str(v) if not isinstance(v, bool) else str(v).lower() for v in _as_list(wanted)]

    if op == "Null":
        # "true": the key must be absent; "false": it must be present.
        want_absent = any(v.lower() == "true" for v in policy_values)
        return (present is None or present == []) == want_absent
    if op not in OPERATORS:
        raise UnsupportedCondition(f"condition operator {operator!r}")
    match, negated = OPERATORS[op]
    values = present or []

    def ok(v: str) -> bool:
        hit = any(match(v, p, context) for p in policy_values)
        return not hit if negated else hit

    if qualifier == "ForAllValues":
        # True when every value in the request matches, also when there is none.
        return all(ok(v) for v in values)
    if qualifier == "ForAnyValue":
        return any(ok(v) for v in values)
    if not values:
        # Absent key: no match, so false; true for a negated operator, and with ...IfExists.
        return if_exists or negated
    if negated:
        return all(ok(v) for v in values)
    return any(ok(v) for v in values)


def conditions_hold(stmt: dict, context: dict[str, list[str]]) -> bool:
    block = stmt.get("Condition") or {}
    for operator, keys in block.items():
        for key, wanted in keys.items():
            if not condition_holds(operator, key, wanted, context):
                return False
    return True


def applies(stmt: dict, check: Check) -> bool:
    return (
        action_matches(stmt, check.action)
        and resource_matches(stmt, check.resource, check.context)
        and conditions_hold(stmt, check.context)
    )


def evaluate(stmts: list[dict], checks: list[Check]) -> Decision:
    relevant = [s for s in stmts if "Principal" not in s and "NotPrincipal" not in s]
    allowed_by = []
    for check in checks:
        if any(s.get("Effect") == "Deny" and applies(s, check) for s in relevant):
            return Decision(False, check, explicit=True)
        allowing = [s for s in relevant if s.get("Effect") == "Allow" and applies(s, check)]
        if not allowing:
            return Decision(False, check)
        allowed_by.append(str(allowing[0].get("Sid") or f"#{stmts.index(allowing[0])}"))
    return Decision(True, allowed_by=allowed_by)
