from __future__ import annotations

import pytest

from revconn import ConfigError, Scope, SharedSecretPolicy, generate_secret
from revconn._gateway.auth import bearer_credential

SECRET = "s3cret-s3cret-s3cret"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"authorization", b"Bearer abc")], "abc"),
        ([(b"Authorization", b"bearer   abc  ")], "abc"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"authorization", b"Bearer")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([(b"authorization", b"Bearer \xff\xfe")], None),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], None),
        ([(b"cookie", b"token=abc")], None),
        ([], None),
    ],
)
def test_bearer_credential(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert bearer_credential(headers) == expected


def test_shared_secret_policy() -> None:
    policy = SharedSecretPolicy(SECRET)
    assert policy.allows(SECRET, agent="a", scope=Scope.CONNECT)
    assert policy.allows(SECRET, agent=None, scope=Scope.ADMIN)
    assert not policy.allows(SECRET + "x", agent="a", scope=Scope.CONNECT)
    assert not policy.allows(None, agent="a", scope=Scope.CONNECT)
    assert not policy.allows("", agent="a", scope=Scope.CONNECT)
    assert not policy.allows("\udcff", agent="a", scope=Scope.CONNECT)
    assert SECRET not in repr(policy)


@pytest.mark.parametrize("secret", ["", "   ", "short"])
def test_refuses_weak_secret(secret: str) -> None:
    with pytest.raises(ConfigError):
        SharedSecretPolicy(secret)


def test_generated_secret_is_strong_and_fresh() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b
    assert len(a) >= 43
    SharedSecretPolicy(a)
