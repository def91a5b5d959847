"""AWS's request limits that moto does not enforce (pure: a request's parameters in, the error
AWS answers out). extensions.py applies them in front of moto's handlers.

EC2 filter values: one filter of a request (`Filter.N.Value.M`, e.g. DescribeTags' `resource-id`)
takes at most 200 values; a request with more is refused whole with `FilterLimitExceeded` (HTTP
400), nothing is paged.
  https://docs.aws.amazon.com/AWSEC2/latest/APIReference/Query-Requests-EC2.html#query-filtering
  https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html (FilterLimitExceeded:
  "The request uses too many filters or too many filter values.")
"""

from __future__ import annotations

import re

EC2_FILTER_VALUES_MAX = 200
_FILTER_VALUE = re.compile(r"^Filter\.(\d+)\.Value\.\d+$")


def ec2_filter_limit(params: dict) -> tuple[str, str] | None:
    """(code, message) when a filter of this EC2 query request has more values than AWS takes,
    else None. `params` maps each query parameter name to its value(s), as moto's querystring."""
    counts: dict[str, int] = {}
    for name in params:
        m = _FILTER_VALUE.match(name)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    for n, count in sorted(counts.items()):
        if count > EC2_FILTER_VALUES_MAX:
            filter_name = params.get(f"Filter.{n}.Name", ["?"])
            filter_name = filter_name[0] if isinstance(filter_name, list) else filter_name
            return ("FilterLimitExceeded",
                    f"The maximum number of filter values specified on a single call is "
                    f"{EC2_FILTER_VALUES_MAX} (filter {filter_name} has {count})")
    return None
