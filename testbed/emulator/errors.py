"""AWS's error answers in the shape each service's protocol gives them (auth's denials, the request
limits' refusals)."""

from __future__ import annotations

import uuid
from xml.sax.saxutils import escape as xml_escape

from moto.core.exceptions import JsonRESTError, _RESTError


class ProtocolError(_RESTError):
    """An error rendered as the service's protocol shapes it (moto's _RESTError body,
    ErrorResponse/Errors/Error, is read by botocore but not by the Rust SDK's parsers):
      awsQuery (Auto Scaling, CloudFormation, IAM, STS): ErrorResponse/Error/{Type,Code,Message}
        https://smithy.io/2.0/aws/protocols/aws-query-protocol.html
      ec2Query: Response/Errors/Error/{Code,Message}
        https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html"""

    def __init__(self, service: str, error_type: str, message: str, status: int = 403):
        super().__init__(error_type, message)
        self.code = status
        rid = uuid.uuid4().hex
        msg = xml_escape(message)
        if service == "ec2":
            self.description = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>"
                                f"<Code>{error_type}</Code><Message>{msg}</Message></Error></Errors>"
                                f"<RequestID>{rid}</RequestID></Response>")
        else:
            self.description = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ErrorResponse><Error>"
                                f"<Type>Sender</Type><Code>{error_type}</Code><Message>{msg}</Message>"
                                f"</Error><RequestId>{rid}</RequestId></ErrorResponse>")


def denial(resp, message: str) -> _RESTError:
    """An access denial in the request's protocol (see auth.access_denied for the message)."""
    if resp.headers.get("X-Amz-Target"):
        return JsonRESTError("AccessDeniedException", message)
    if resp.service_name == "ec2":
        return ProtocolError("ec2", "UnauthorizedOperation", message)
    return ProtocolError(resp.service_name, "AccessDenied", message)

