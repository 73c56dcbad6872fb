"""What a start-up check found, as a value: one line each, no account id in it; and the exit
status a set of checks means. Pure; `broker.preflight` runs the checks against AWS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from broker.redact import for_operator

# EX_CONFIG from sysexits.h: the configuration is wrong and starting again will not help. The
# unit names it in `RestartPreventExitStatus=78`, which systemd applies to the main process
# (ExecStart=) only, not to ExecStartPre= commands (systemd.service(5)).
EXIT_CONFIG: Final = 78
# EX_TEMPFAIL: AWS could not be asked (unreachable, throttled, a 5xx, no answer in time); the
# same start may work in a minute, so systemd's Restart=on-failure should try again.
EXIT_TEMPFAIL: Final = 75

# A detail longer than this is cut (AWS's messages are capped at 300 characters already).
MAX_DETAIL: Final = 400


def _detail(text: str) -> str:
    flat = for_operator(text)
    return flat if len(flat) <= MAX_DETAIL else flat[: MAX_DETAIL - 3] + "..."


@attrs.frozen
class Check:
    """The outcome of one check: a name, ok or not, what was found and, on failure, the fix.

    `detail` and `fix` are kept to one line without account ids whatever they are given.
    `transient` marks a failure of asking (AWS unreachable, throttled, a 5xx, a timeout) rather
    than of the setup: starting again later may succeed.
    """

    name: str
    ok: bool
    detail: str = attrs.field(converter=_detail)
    fix: str = attrs.field(default="", converter=for_operator)
    transient: bool = False

    def line(self) -> str:
        """`ok   NAME: DETAIL` or `FAIL NAME: DETAIL; FIX`."""
        text = f"{'ok' if self.ok else 'FAIL':<4} {self.name}: {self.detail}"
        return f"{text}; {self.fix}" if self.fix and not self.ok else text

    def __str__(self) -> str:
        return self.line()


def exit_status(checks: Sequence[Check]) -> int:
    """0 when every check passed; `EXIT_TEMPFAIL` when only transient ones failed; else
    `EXIT_CONFIG`."""
    failed = [check for check in checks if not check.ok]
    if not failed:
        return 0
    return EXIT_TEMPFAIL if all(check.transient for check in failed) else EXIT_CONFIG


def failures(checks: Sequence[Check]) -> list[Check]:
    """The checks that failed, in order."""
    return [check for check in checks if not check.ok]


# --- what to do about a failure: the fixes the checks name -----------------------------------

NO_CREDENTIALS_FIX: Final = (
    "give the broker credentials: an instance role (EC2), or a key in "
    "/etc/compute-broker/aws-credentials passed by systemd (LoadCredential=aws:FILE and "
    "Environment=AWS_SHARED_CREDENTIALS_FILE=%d/aws; deploy/install.sh writes that drop-in)"
)
LAUNCH_SETTINGS = "ami_id, instance_type, instance_types, subnets, security_group_ids, key_name"
LAUNCH_FIXES: Final[Mapping[str, str]] = {
    "UnauthorizedOperation": (
        "allow ec2:RunInstances and ec2:CreateTags to the broker's IAM role or user (README, "
        "IAM policy); the log has AWS's encoded reason for `aws sts decode-authorization-message`"
    ),
    "InvalidAMIID.NotFound": "set ami_id to an AMI of {region} this account may use",
    "InvalidAMIID.Malformed": "set ami_id to an AMI of {region} this account may use",
    "InvalidAMIID.Unavailable": "set ami_id to an AMI of {region} this account may use",
    "InvalidSubnetID.NotFound": "set subnet_id or subnets to subnets of {region}",
    "InvalidSubnet": "set subnet_id or subnets to subnets of {region}",
    "InvalidGroup.NotFound": "set security_group_ids to groups of the subnets' VPC in {region}",
    "InvalidSecurityGroupID.NotFound": (
        "set security_group_ids to groups of the subnets' VPC in {region}"
    ),
    "InvalidKeyPair.NotFound": "create or import the key pair in {region}, or set key_name: null",
    "Unsupported": "the type is not offered there: choose another type or another subnet's zone",
    "OptInRequired": "the account (or the AMI's Marketplace product) needs a subscription",
    "PendingVerification": "AWS is still verifying the account; wait, or ask AWS Support",
    "Blocked": "the account is blocked; ask AWS Support",
    "DryRunIgnored": (
        "the EC2 endpoint ignored DryRun (check AWS_ENDPOINT_URL); terminate what it launched"
    ),
}
