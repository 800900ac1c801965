"""TokenPolicy: per-agent and admin tokens, revocation and the optional
shared secret, as the gateway's surfaces ask it (sans-I/O)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from revconn._gateway.auth import (
    Admission,
    Denial,
    Grant,
    Scope,
    SharedSecretPolicy,
    TokenPolicy,
    admit_agent_name,
)
from revconn._gateway.ratelimit import FailureLimiter
from revconn._gateway.replies import Reply
from revconn._gateway.tokens import RevocationList, SigningKey, TokenVerifier, issue_token

KEY = SigningKey(bytes(range(32)))
SECRET = "shared-secret-0123456789"


@pytest.fixture
def revoked(tmp_path: Path) -> RevocationList:
    path = tmp_path / "revoked.txt"
    path.write_text("")
    return RevocationList(path)


def policy(revoked: RevocationList | None = None, *, shared: str | None = SECRET) -> TokenPolicy:
    return TokenPolicy(
        TokenVerifier([KEY]),
        revoked=revoked,
        shared_secret=None if shared is None else SharedSecretPolicy(shared),
    )


def revoke(revoked: RevocationList, *token_ids: str) -> None:
    with revoked.path.open("a") as file:
        file.writelines(f"{token_id}\n" for token_id in token_ids)
    revoked.reload()


def body(reply: Reply) -> dict[str, object]:
    assert dict(reply.headers)[b"content-type"] == b"application/json"
    assert int(dict(reply.headers)[b"content-length"]) == len(reply.body)
    payload: dict[str, object] = json.loads(reply.body)
    return payload


def denial(verdict: Grant | Denial, status: int, error: str) -> Denial:
    assert isinstance(verdict, Denial), verdict
    assert (verdict.status, verdict.error) == (status, error)
    reply = verdict.reply()
    assert reply.status == status
    assert body(reply) == {"error": error, "detail": verdict.detail}
    challenge = dict(reply.headers).get(b"www-authenticate")
    if status == 401:
        expected = b'Bearer realm="revconn"'
        if error != "unauthorized":
            expected += b', error="invalid_token"'
        assert challenge == expected
    else:
        assert challenge is None  # 403: the credential is fine, just not for this
    return verdict


def test_agent_token_for_its_own_name_is_granted_with_id_and_expiry() -> None:
    token, claims = issue_token(KEY, "svc", expires_in=600)
    verdict = policy().authenticate(token, agent="svc", scope=Scope.CONNECT)
    assert verdict == Grant(claims.token_id, claims.expires_at, KEY.id)
    assert claims.expires_at is not None and claims.expires_at > time.time()
    forever, claims = issue_token(KEY, "svc")
    verdict = policy().authenticate(forever, agent="svc", scope=Scope.CONNECT)
    assert verdict == Grant(claims.token_id, None, KEY.id)


def test_agent_token_for_another_name_is_403_wrong_agent() -> None:
    token, _ = issue_token(KEY, "svc")
    verdict = denial(
        policy().authenticate(token, agent="other", scope=Scope.CONNECT), 403, "wrong_agent"
    )
    assert verdict.detail == "this token connects only as 'svc'"
    assert token not in verdict.reply().body.decode()


def test_agent_token_on_the_admin_surface_is_403_wrong_scope() -> None:
    token, _ = issue_token(KEY, "svc")
    verdict = denial(
        policy().authenticate(token, agent=None, scope=Scope.ADMIN), 403, "wrong_scope"
    )
    assert "admin token" in verdict.detail


@pytest.mark.parametrize("agent", ["svc", "admin", None])
def test_admin_token_opens_no_tunnel(agent: str | None) -> None:
    token, _ = issue_token(KEY, None, admin=True)
    verdict = denial(
        policy().authenticate(token, agent=agent, scope=Scope.CONNECT), 403, "wrong_scope"
    )
    assert verdict.detail == "an admin token cannot open a tunnel"


def test_admin_token_opens_the_admin_surface() -> None:
    token, claims = issue_token(KEY, None, admin=True, expires_in=60)
    verdict = policy(shared=None).authenticate(token, agent=None, scope=Scope.ADMIN)
    assert verdict == Grant(claims.token_id, claims.expires_at, KEY.id)


def test_expired_token_is_401_expired() -> None:
    token, _ = issue_token(KEY, "svc", expires_in=10, now=time.time() - 11)
    verdict = denial(policy().authenticate(token, agent="svc", scope=Scope.CONNECT), 401, "expired")
    assert "expired" in verdict.detail
    admin, _ = issue_token(KEY, None, admin=True, expires_in=10, now=time.time() - 11)
    denial(policy().authenticate(admin, agent=None, scope=Scope.ADMIN), 401, "expired")


def test_revoked_token_is_401_revoked(revoked: RevocationList) -> None:
    token, claims = issue_token(KEY, "svc")
    kept, _ = issue_token(KEY, "svc")
    admin, admin_claims = issue_token(KEY, None, admin=True)
    p = policy(revoked)
    assert isinstance(p.authenticate(token, agent="svc", scope=Scope.CONNECT), Grant)
    assert not p.is_revoked(claims.token_id)
    revoke(revoked, claims.token_id, admin_claims.token_id)
    assert p.is_revoked(claims.token_id)
    assert not p.is_revoked(None)
    verdict = denial(p.authenticate(token, agent="svc", scope=Scope.CONNECT), 401, "revoked")
    assert "revoked" in verdict.detail
    # revocation is checked before name and scope: the answer is the same everywhere
    denial(p.authenticate(token, agent="other", scope=Scope.CONNECT), 401, "revoked")
    denial(p.authenticate(token, agent=None, scope=Scope.ADMIN), 401, "revoked")
    denial(p.authenticate(admin, agent=None, scope=Scope.ADMIN), 401, "revoked")
    # another token for the same name is unaffected
    assert isinstance(p.authenticate(kept, agent="svc", scope=Scope.CONNECT), Grant)


def test_an_unrevoked_token_works_again(revoked: RevocationList) -> None:
    token, claims = issue_token(KEY, "svc")
    p = policy(revoked)
    revoke(revoked, claims.token_id)
    denial(p.authenticate(token, agent="svc", scope=Scope.CONNECT), 401, "revoked")
    revoked.path.write_text("# nothing revoked any more\n")
    revoked.reload()
    assert isinstance(p.authenticate(token, agent="svc", scope=Scope.CONNECT), Grant)


def test_shared_secret_still_accepted_when_configured() -> None:
    p = policy()
    assert p.authenticate(SECRET, agent="svc", scope=Scope.CONNECT) == Grant()
    assert p.authenticate(SECRET, agent="any-name", scope=Scope.CONNECT) == Grant()
    assert p.authenticate(SECRET, agent=None, scope=Scope.ADMIN) == Grant()
    denial(p.authenticate(SECRET + "x", agent="svc", scope=Scope.CONNECT), 401, "unauthorized")


def test_shared_secret_refused_without_one() -> None:
    p = policy(shared=None)
    denial(p.authenticate(SECRET, agent="svc", scope=Scope.CONNECT), 401, "unauthorized")
    denial(p.authenticate(SECRET, agent=None, scope=Scope.ADMIN), 401, "unauthorized")
    token, _ = issue_token(KEY, "svc")
    assert isinstance(p.authenticate(token, agent="svc", scope=Scope.CONNECT), Grant)


def test_a_shared_secret_shaped_like_a_token_still_works() -> None:
    """A secret with two dots has a JWT's shape; it must not be refused as a
    bad token when it is the configured shared secret."""
    dotted = "my.shared.secret-0123456789"
    p = policy(shared=dotted)
    assert p.authenticate(dotted, agent="svc", scope=Scope.CONNECT) == Grant()
    assert p.authenticate(dotted, agent=None, scope=Scope.ADMIN) == Grant()
    denial(
        p.authenticate("my.shared.secret-x", agent="svc", scope=Scope.CONNECT), 401, "unauthorized"
    )


@pytest.mark.parametrize(
    "credential",
    [None, "", "garbage", "a.b.c", "\udcff.\udcff.\udcff", "x" * 10_000, "x." * 3000],
)
def test_missing_or_bad_credentials_are_401_unauthorized(credential: str | None) -> None:
    verdict = denial(
        policy().authenticate(credential, agent="svc", scope=Scope.CONNECT), 401, "unauthorized"
    )
    assert verdict.detail == "missing or invalid bearer credential"


def test_a_token_of_another_gateway_is_401_unauthorized_without_saying_why() -> None:
    token, _ = issue_token(SigningKey(bytes(range(1, 33))), "svc")
    verdict = denial(
        policy().authenticate(token, agent="svc", scope=Scope.CONNECT), 401, "unauthorized"
    )
    assert "key" not in verdict.detail


@settings(max_examples=150, deadline=None)
@given(
    st.text(
        st.characters(codec=None) | st.integers(0xD800, 0xDFFF).map(chr) | st.just("."),
        max_size=100,
    ),
    st.sampled_from([Scope.CONNECT, Scope.ADMIN]),
)
@example("\udcff.a.b", Scope.CONNECT)
def test_authenticate_never_raises(credential: str, scope: Scope) -> None:
    agent = "svc" if scope is Scope.CONNECT else None
    verdict = policy().authenticate(credential, agent=agent, scope=scope)
    assert isinstance(verdict, Denial) and verdict.status == 401


def test_repr_names_the_keys_never_the_secrets() -> None:
    text = repr(policy())
    assert text == f"TokenPolicy(keys=[{KEY.id}], shared secret)"
    assert SECRET not in text and KEY.secret.hex() not in text
    assert repr(policy(shared=None)) == f"TokenPolicy(keys=[{KEY.id}])"


# -- admit_agent_name: what /ws/connect and /announce make of the verdicts ---------------


def admit(p: TokenPolicy, name: str, credential: str, limiter: FailureLimiter) -> Admission | Reply:
    return admit_agent_name(
        p,
        {"name": [name]},
        [(b"authorization", f"Bearer {credential}".encode())],
        shutting_down=False,
        limiter=limiter,
        source="192.0.2.1",
        surface="/ws/connect",
    )


def test_admission_carries_the_grant() -> None:
    limiter = FailureLimiter(3, 60, clock=lambda: 0.0)
    token, claims = issue_token(KEY, "svc", expires_in=60)
    admitted = admit(policy(), "svc", token, limiter)
    assert admitted == Admission("svc", Grant(claims.token_id, claims.expires_at, KEY.id))
    assert admit(policy(), "svc", SECRET, limiter) == Admission("svc", Grant())


def test_a_403_is_not_a_failed_authentication_but_a_401_is(revoked: RevocationList) -> None:
    """A valid token for the wrong name or scope proves its holder has a
    credential: it does not count towards the lock-out; a revoked one does."""
    limiter = FailureLimiter(1, 60, clock=lambda: 0.0)
    token, claims = issue_token(KEY, "svc")
    admin, _ = issue_token(KEY, None, admin=True)
    p = policy(revoked)
    for credential, name in ((token, "other"), (admin, "svc"), (token, "other")):
        reply = admit(p, name, credential, limiter)
        assert isinstance(reply, Reply) and reply.status == 403
    assert admit(p, "svc", token, limiter) == Admission("svc", Grant(claims.token_id, None, KEY.id))
    revoke(revoked, claims.token_id)
    reply = admit(p, "svc", token, limiter)
    assert isinstance(reply, Reply) and reply.status == 401
    assert body(reply)["error"] == "revoked"
    reply = admit(p, "svc", SECRET, limiter)
    assert isinstance(reply, Reply) and reply.status == 429  # locked out after one 401
