"""Token keys, issuing and verifying, and the revoked-tokens file (sans-I/O:
no network, files in tmp_path only)."""

from __future__ import annotations

import base64
import json
import os
import stat
import string
import time
import warnings
from pathlib import Path

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from revconn import ConfigError
from revconn._gateway.tokens import (
    KEY_PREFIX,
    LEEWAY,
    MAX_TOKEN_LENGTH,
    TOKEN_ID,
    InvalidToken,
    RevocationList,
    SigningKey,
    TokenClaims,
    TokenVerifier,
    issue_token,
    parse_revoked,
)

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(
    payload: dict[str, object], key: SigningKey = KEY, header: dict[str, object] | None = None
) -> str:
    """A token with any claims (and header fields), properly signed by ``key``."""
    headers = {"kid": key.id, **(header or {})}
    return jwt.encode(payload, key.secret, algorithm="HS256", headers=headers)


def valid_claims(**over: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": "revconn",
        "jti": "id-1",
        "iat": int(time.time()),
        "scope": "agent",
        "sub": "svc",
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


# -- keys ---------------------------------------------------------------------------


def test_generated_keys_are_fresh_and_named_without_revealing_the_secret() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    assert len(a.secret) == 32 and a.secret != b.secret
    assert a.id != b.id
    assert len(a.id) == 16 and all(c in string.hexdigits for c in a.id)
    assert a.id == SigningKey(a.secret).id  # derived from the key, stable
    assert repr(a) == f"SigningKey(id={a.id})"
    assert b64(a.secret) not in repr(a) and a.secret.hex() not in repr(a)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes, got 31"):
        SigningKey(b"x" * 31)


def test_text_parses_back_to_the_same_key() -> None:
    key = SigningKey.generate()
    text = key.text()
    assert text.startswith(KEY_PREFIX) and text.endswith("\n") and text.count("\n") == 1
    assert "=" not in text  # unpadded
    assert SigningKey.parse(text) == key
    assert SigningKey.parse(f"  \n{text.strip()}\n\n") == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not a revconn token key.*revconn-token-key-v1:.*token keygen"),
        ("hello", "is not a revconn token key"),
        (b64(bytes(32)), "is not a revconn token key"),  # no prefix
        (KEY_PREFIX + "A", "not valid base64"),  # 1 char more than a multiple of 4
        (KEY_PREFIX + "\u00e9" * 43, "not valid base64"),
        (KEY_PREFIX + b64(bytes(16)), "at least 32 bytes, got 16"),
        (KEY_PREFIX, "at least 32 bytes, got 0"),
    ],
)
def test_parse_refuses_what_is_not_a_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        SigningKey.parse(text, "the file k.key")
    assert str(info.value).startswith("the file k.key")


def test_write_creates_a_private_file_that_load_reads(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "gw.key"
    old = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        key.write(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.text()
    assert SigningKey.load(path) == key
    assert SigningKey.load(str(path)) == key


def test_write_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "gw.key"
    first = SigningKey.generate()
    first.write(path)
    with pytest.raises(ConfigError, match=r"exists: a key is never overwritten") as info:
        SigningKey.generate().write(path)
    assert str(path) in str(info.value)
    assert SigningKey.load(path) == first
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    with pytest.raises(ConfigError, match="never overwritten"):
        first.write(other)
    assert other.read_text() == "precious"


def test_write_where_no_file_can_be_created(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "gw.key"
    with pytest.raises(ConfigError, match=f"cannot create {path}: No such file or directory"):
        SigningKey.generate().write(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601, 0o610])
def test_load_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "gw.key"
    SigningKey.generate().write(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        SigningKey.load(path)
    message = str(info.value)
    assert f"token key file {path} is accessible to other users" in message
    assert f"(mode {mode:04o})" in message
    assert f"chmod 600 {path}" in message


def test_load_accepts_owner_only_modes(tmp_path: Path) -> None:
    path = tmp_path / "gw.key"
    key = SigningKey.generate()
    key.write(path)
    path.chmod(0o400)
    assert SigningKey.load(path) == key


def test_load_names_the_missing_file_and_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(ConfigError) as info:
        SigningKey.load(path)
    assert str(info.value) == (
        f"token key file {path} does not exist: create one with "
        f"`revconn-gateway token keygen {path}`"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key\n", "is not a revconn token key"),
        ((KEY_PREFIX + "abc").encode(), "at least 32 bytes"),
        (b"\xff\xfe garbage", "not ASCII text"),
    ],
)
def test_load_names_the_file_of_a_malformed_key(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "gw.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=message) as info:
        SigningKey.load(path)
    assert str(info.value).startswith(f"token key file {path}")


def test_load_of_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"token key file {tmp_path} is not a regular file"):
        SigningKey.load(tmp_path)


def test_a_key_is_checked_on_the_file_it_is_read_from(tmp_path: Path) -> None:
    """A symlink to a private key is followed (as secret volumes mount them),
    and the mode checked is the target's, on the open descriptor."""
    key = SigningKey.generate()
    target = tmp_path / "real.key"
    key.write(target)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert SigningKey.load(link).id == key.id
    target.chmod(0o644)
    with pytest.raises(ConfigError, match="is accessible to other users"):
        SigningKey.load(link)


# -- issuing and verifying -------------------------------------------------------------


def test_agent_token_roundtrip() -> None:
    token, claims = issue_token(KEY, "svc", now=1_700_000_000)
    assert claims == TokenClaims(claims.token_id, "svc", False, 1_700_000_000, None, KEY.id)
    assert TOKEN_ID.fullmatch(claims.token_id) and len(claims.token_id) == 32
    assert TokenVerifier([KEY]).verify(token) == claims
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT", "kid": KEY.id}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "iss": "revconn",
        "jti": claims.token_id,
        "iat": 1_700_000_000,
        "scope": "agent",
        "sub": "svc",
    }
    assert claims.to_json() == {
        "id": claims.token_id,
        "name": "svc",
        "admin": False,
        "issued_at": 1_700_000_000,
        "expires_at": None,
    }


def test_admin_token_roundtrip() -> None:
    now = time.time()
    token, claims = issue_token(KEY, None, admin=True, expires_in=3600, now=now)
    assert claims.admin and claims.name is None
    assert claims.expires_at == int(now) + 3600
    assert TokenVerifier([KEY]).verify(token) == claims
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["scope"] == "admin" and "sub" not in payload
    assert payload["exp"] == int(now) + 3600


def test_every_token_has_its_own_id() -> None:
    ids = {issue_token(KEY, "svc")[1].token_id for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize(
    ("name", "admin", "expires_in", "message"),
    [
        (None, False, None, "either bound to an agent name or an admin token"),
        ("svc", True, None, "either bound to an agent name or an admin token"),
        ("Bad_Name", False, None, "not a valid agent name"),
        ("", False, None, "not a valid agent name"),
        ("svc", False, 0, "lifetime must be positive"),
        ("svc", False, -5, "lifetime must be positive"),
        ("svc", False, float("nan"), "lifetime must be positive"),
        ("svc", False, float("inf"), "lifetime must be positive"),
    ],
)
def test_issue_refuses_bad_requests(
    name: str | None, admin: bool, expires_in: float | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        issue_token(KEY, name, admin=admin, expires_in=expires_in)


def test_a_short_lifetime_is_rounded_up_to_one_second() -> None:
    _, claims = issue_token(KEY, "svc", expires_in=0.2, now=1000)
    assert claims.expires_at == 1001


def test_expiry_is_exact() -> None:
    token, claims = issue_token(KEY, "svc", expires_in=60, now=1000)
    assert claims.expires_at == 1060
    verifier = TokenVerifier([KEY])
    assert verifier.verify(token, now=1059.999) == claims
    for now in (1060, 1060.001, 5000):
        with pytest.raises(InvalidToken) as info:
            verifier.verify(token, now=now)
        assert (info.value.reason, info.value.detail) == ("expired", "the token has expired")
    # and against the real clock, without `now`
    past, _ = issue_token(KEY, "svc", expires_in=60, now=time.time() - 61)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(past)
    current, _ = issue_token(KEY, "svc", expires_in=60)
    assert verifier.verify(current).name == "svc"


def test_issue_time_in_the_future_beyond_the_leeway_is_refused() -> None:
    token, claims = issue_token(KEY, "svc", now=10_000)
    verifier = TokenVerifier([KEY])
    assert verifier.verify(token, now=10_000 - LEEWAY) == claims  # a clock ahead by 30 s: fine
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token, now=10_000 - LEEWAY - 0.5)
    assert info.value.reason == "invalid"
    assert "issue time is in the future" in info.value.detail
    future, _ = issue_token(KEY, "svc", now=time.time() + 120)
    with pytest.raises(InvalidToken, match="in the future"):
        verifier.verify(future)


def test_a_token_signed_with_an_unknown_key_is_refused() -> None:
    token, _ = issue_token(OTHER, "svc")
    with pytest.raises(InvalidToken) as info:
        TokenVerifier([KEY]).verify(token)
    assert (info.value.reason, info.value.detail) == ("invalid", "signed with an unknown key")
    # claiming a known kid does not help without the key itself
    lying = jwt.encode(valid_claims(), OTHER.secret, algorithm="HS256", headers={"kid": KEY.id})
    with pytest.raises(InvalidToken, match="signature or claims are invalid"):
        TokenVerifier([KEY]).verify(lying)
    no_kid = jwt.encode(valid_claims(), KEY.secret, algorithm="HS256")
    with pytest.raises(InvalidToken, match="unknown key"):
        TokenVerifier([KEY]).verify(no_kid)


def test_rotation_both_keys_verify_and_removing_the_old_refuses_its_tokens() -> None:
    old, new = KEY, OTHER
    old_token, old_claims = issue_token(old, "svc")
    during = TokenVerifier([new, old])
    assert during.key_ids == (new.id, old.id)  # the first is the one that signs
    new_token, new_claims = issue_token(new, "svc")
    assert jwt.get_unverified_header(new_token)["kid"] == during.key_ids[0]
    assert during.verify(old_token) == old_claims
    assert during.verify(new_token) == new_claims
    after = TokenVerifier([new])
    assert after.verify(new_token) == new_claims
    with pytest.raises(InvalidToken, match="unknown key"):
        after.verify(old_token)


def test_verifier_needs_distinct_keys() -> None:
    with pytest.raises(ConfigError, match="at least one key"):
        TokenVerifier([])
    with pytest.raises(ConfigError, match="same token key was given twice"):
        TokenVerifier([KEY, OTHER, SigningKey(KEY.secret)])


def test_tampered_signature_or_payload_is_refused() -> None:
    token, _ = issue_token(KEY, "svc")
    header, payload, signature = token.split(".")
    verifier = TokenVerifier([KEY])
    flipped = signature[:5] + ("A" if signature[5] != "A" else "B") + signature[6:]
    admin_payload = json.loads(base64.urlsafe_b64decode(payload + "=="))
    admin_payload.update(scope="admin")
    admin_payload.pop("sub")
    other_name = json.loads(base64.urlsafe_b64decode(payload + "=="))
    other_name.update(sub="other")
    for bad in (
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.",
        f"{header}.{b64(json.dumps(admin_payload).encode())}.{signature}",
        f"{header}.{b64(json.dumps(other_name).encode())}.{signature}",
    ):
        with pytest.raises(InvalidToken) as info:
            verifier.verify(bad)
        assert info.value.reason == "invalid"


def test_alg_none_and_other_algorithms_are_refused() -> None:
    verifier = TokenVerifier([KEY])
    claims = valid_claims()
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": KEY.id})
    assert unsigned.endswith(".")
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": KEY.id}).encode())
    payload = b64(json.dumps(claims).encode())
    handmade = f"{header}.{payload}."
    with warnings.catch_warnings():  # (PyJWT: 32 bytes is short for SHA-384/512)
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        hs512 = jwt.encode(claims, KEY.secret, algorithm="HS512", headers={"kid": KEY.id})
        hs384 = jwt.encode(claims, KEY.secret, algorithm="HS384", headers={"kid": KEY.id})
    # an HS256 signature under a header that names another algorithm
    good = forge(claims)
    relabel = b64(json.dumps({"alg": "HS512", "typ": "JWT", "kid": KEY.id}).encode())
    relabelled = relabel + good[good.index(".") :]
    for bad in (unsigned, handmade, hs512, hs384, relabelled):
        with pytest.raises(InvalidToken) as info:
            verifier.verify(bad)
        assert info.value.reason == "invalid", bad


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"iss": "someone-else"}, "signature or claims are invalid"),
        ({"iss": None}, "signature or claims are invalid"),
        ({"jti": None}, "signature or claims are invalid"),
        ({"jti": "has space"}, "no valid id"),
        ({"jti": "x" * 129}, "no valid id"),
        ({"iat": None}, "signature or claims are invalid"),
        ({"iat": 1.5}, "issue time"),
        ({"iat": "1"}, "issue time"),
        ({"scope": None}, "signature or claims are invalid"),
        ({"scope": "root"}, "scope is invalid"),
        ({"scope": "agent", "sub": None}, "scope is invalid"),
        ({"scope": "agent", "sub": "Not-A-Label"}, "scope is invalid"),
        ({"scope": "admin", "sub": "svc"}, "scope is invalid"),
        ({"exp": "tomorrow"}, "expiry is not a time"),
        ({"exp": 4102444800.5}, "expiry is not a time"),
        ({"exp": 10**400}, "expiry is not a time"),  # (would overflow a timer)
        ({"exp": True}, "expiry is not a time"),
        ({"iat": True}, "issue time is not a time"),
        ({"iat": -1}, "issue time is not a time"),
        ({"nbf": int(time.time()) + 3600}, "signature or claims are invalid"),
    ],
)
def test_signed_tokens_with_bad_claims_are_invalid(changes: dict[str, object], detail: str) -> None:
    claims = valid_claims()
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}
    with pytest.raises(InvalidToken) as info:
        TokenVerifier([KEY]).verify(forge(claims))
    assert info.value.reason == "invalid"
    assert detail in info.value.detail


def test_over_long_credentials_are_refused_before_parsing() -> None:
    verifier = TokenVerifier([KEY])
    padded = forge(valid_claims(pad="x" * MAX_TOKEN_LENGTH))
    assert len(padded) > MAX_TOKEN_LENGTH
    with pytest.raises(InvalidToken) as info:
        verifier.verify(padded)
    assert info.value.detail == "the token is too long"
    with pytest.raises(InvalidToken, match="too long"):
        verifier.verify("." * (MAX_TOKEN_LENGTH + 1))
    # just below the limit it is parsed (and valid)
    fits = forge(valid_claims(pad="x" * 2800))
    assert len(fits) <= MAX_TOKEN_LENGTH
    assert verifier.verify(fits).name == "svc"


@pytest.mark.parametrize(
    "credential",
    [
        "",
        ".",
        "..",
        "a.b.c",
        "garbage here",
        "\udcff.a.b",
        "\u00e9.\u00e9.\u00e9",
        "\x00.\x00.\x00",
    ],
)
def test_garbage_is_invalid_and_never_echoed(credential: str) -> None:
    with pytest.raises(InvalidToken) as info:
        TokenVerifier([KEY]).verify(credential)
    assert info.value.reason == "invalid"
    if credential.strip("."):
        assert credential not in str(info.value)


def test_non_ascii_inside_a_valid_token_is_refused() -> None:
    token = forge(valid_claims())
    verifier = TokenVerifier([KEY])
    for bad in (
        token + "\u00e9",
        "\u00e9" + token,
        token.replace(".", "\u2024", 1),
        token + "\udc80",
    ):
        with pytest.raises(InvalidToken):
            verifier.verify(bad)


def assert_only_invalid_token(verifier: TokenVerifier, credential: str) -> TokenClaims | None:
    """verify() returns claims or raises InvalidToken: never anything else."""
    try:
        return verifier.verify(credential)
    except InvalidToken as exc:
        assert exc.reason in ("invalid", "expired")
        return None


ANY_TEXT = st.text(
    st.characters(codec=None) | st.integers(0xD800, 0xDFFF).map(chr) | st.sampled_from(".-_=+/"),
    max_size=200,
)
B64ISH = st.text(string.ascii_letters + string.digits + "-_=+/ ", max_size=80)


@BOUNDED
@given(ANY_TEXT)
@example("\udcff")
@example("\udcff.\udcff.\udcff")
def test_arbitrary_text_only_ever_raises_invalid_token(credential: str) -> None:
    assert assert_only_invalid_token(TokenVerifier([KEY]), credential) is None


@BOUNDED
@given(st.lists(B64ISH | ANY_TEXT, min_size=3, max_size=3))
def test_three_dotted_parts_only_ever_raise_invalid_token(parts: list[str]) -> None:
    assert assert_only_invalid_token(TokenVerifier([KEY]), ".".join(parts)) is None


@BOUNDED
@given(st.data())
def test_mutated_tokens_never_verify_with_other_claims(data: st.DataObject) -> None:
    token, claims = issue_token(KEY, "svc", expires_in=3600)
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from(string.ascii_letters + string.digits + "-_.=\u00e9"))
    mutated = token[:index] + replacement + token[index + 1 :]
    got = assert_only_invalid_token(TokenVerifier([KEY]), mutated)
    # Base64's spare bits can make a changed character decode to the same
    # bytes: then, and only then, the token still verifies, unchanged.
    assert got is None or got == claims


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
CLAIM_VALUES = {
    "iss": st.just("revconn") | JSON_VALUES,
    "jti": st.just("id-1") | st.from_regex(TOKEN_ID, fullmatch=True) | JSON_VALUES,
    "iat": st.integers(0, int(time.time()) + 100) | JSON_VALUES,
    "scope": st.sampled_from(["agent", "admin"]) | JSON_VALUES,
    "sub": st.sampled_from(["svc", "a-b"]) | JSON_VALUES,
    "exp": st.integers(0, 2**40) | JSON_VALUES,
    "nbf": JSON_VALUES,
}


@BOUNDED
@given(
    st.fixed_dictionaries({}, optional=CLAIM_VALUES),
    st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "x"]), JSON_VALUES, max_size=2),
)
def test_signed_tokens_with_arbitrary_claims_only_ever_raise_invalid_token(
    claims: dict[str, object], header: dict[str, object]
) -> None:
    header.pop("alg", None)  # (jwt.encode sets it)
    try:
        token = forge(claims, header=header)
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # not encodable as a JWT
    got = assert_only_invalid_token(TokenVerifier([KEY]), token)
    if got is not None:  # accepted: then it is what the rules allow
        assert claims["iss"] == "revconn"
        assert isinstance(got.token_id, str) and TOKEN_ID.fullmatch(got.token_id)
        assert got.token_id == claims["jti"]
        assert got.admin == (claims["scope"] == "admin")
        assert got.name == (None if got.admin else claims["sub"])
        assert got.expires_at is None or got.expires_at > time.time()


# -- the revoked-tokens file --------------------------------------------------------------


def test_parse_revoked_skips_blanks_and_comments() -> None:
    lines = [
        "# revoked tokens",
        "",
        "   ",
        "abc123",
        "  def-456_X  # laptop stolen",
        "abc123",
        "#ghi",
    ]
    assert parse_revoked(lines, "f") == frozenset({"abc123", "def-456_X"})
    assert parse_revoked([], "f") == frozenset()


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("two ids", "'two ids'"),
        ("a,b", "'a,b'"),
        ("x" * 129, repr("x" * 40)),
        ("t\u00f6ken", "'t\u00f6ken'"),
    ],
)
def test_parse_revoked_names_the_source_and_line_of_a_bad_line(line: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_revoked(["ok-1", "# fine", line], "revoked-tokens file /x/rev.txt")
    message = str(info.value)
    assert message.startswith(f"revoked-tokens file /x/rev.txt line 3: {shown} is not a token id")
    assert "one id a line" in message


def test_revocation_list_loads_and_answers_membership(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("aaa\n# comment\nbbb\n")
    revoked = RevocationList(path)
    assert revoked.path == path
    assert revoked.ids == frozenset({"aaa", "bbb"})
    assert "aaa" in revoked and "ccc" not in revoked and None not in revoked
    assert not revoked.changed()


def test_an_empty_file_revokes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("")
    assert RevocationList(path).ids == frozenset()


def test_changed_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("aaa\n")
    revoked = RevocationList(path)
    assert not revoked.changed()
    with path.open("a") as file:
        file.write("bbb\nccc\n")
    assert revoked.changed()
    assert revoked.changed()  # asking does not read
    assert revoked.ids == frozenset({"aaa"})
    assert revoked.reload() == frozenset({"bbb", "ccc"})  # only the new ones
    assert revoked.ids == frozenset({"aaa", "bbb", "ccc"})
    assert not revoked.changed()
    # un-revoking: nothing is new, and the id is no longer listed
    path.write_text("ccc\n")
    assert revoked.changed()
    assert revoked.reload() == frozenset()
    assert revoked.ids == frozenset({"ccc"}) and "aaa" not in revoked
    # reloading an unchanged file is harmless
    assert revoked.reload() == frozenset()


def test_an_atomic_replacement_is_a_change(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("aaa\n")
    revoked = RevocationList(path)
    new = tmp_path / "revoked.txt.new"
    new.write_text("bbb\n")  # same size, another inode
    new.replace(path)
    assert revoked.changed()
    assert revoked.reload() == frozenset({"bbb"})


def test_a_failed_reload_keeps_the_old_list(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("aaa\n")
    revoked = RevocationList(path)
    path.write_text("aaa\nbbb\nnot an id\n")
    assert revoked.changed()
    with pytest.raises(ConfigError) as info:
        revoked.reload()
    assert str(info.value).startswith(f"revoked-tokens file {path} line 3: 'not an id'")
    assert revoked.ids == frozenset({"aaa"})  # "bbb" is not half-applied either
    assert not revoked.changed()  # reported once: the poll waits for the next change
    path.write_text("aaa\nbbb\n")
    assert revoked.reload() == frozenset({"bbb"})
    assert not revoked.changed()


def test_a_file_that_goes_away_keeps_the_list_in_force(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("aaa\n")
    revoked = RevocationList(path)
    path.unlink()
    assert not revoked.changed()  # nothing to reload: the list stays
    with pytest.raises(ConfigError, match="does not exist"):
        revoked.reload()
    assert "aaa" in revoked
    path.write_text("aaa\nbbb\n")
    assert revoked.changed()
    assert revoked.reload() == frozenset({"bbb"})


def test_revocation_list_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as info:
        RevocationList(missing)
    assert str(info.value).startswith(f"revoked-tokens file {missing} does not exist")
    assert "empty is fine" in str(info.value)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=f"revoked-tokens file {binary}: not UTF-8 text"):
        RevocationList(binary)
    bad = tmp_path / "bad.txt"
    bad.write_text("aaa\n\n# note\nb@d\n")
    with pytest.raises(ConfigError, match=f"revoked-tokens file {bad} line 4: 'b@d'"):
        RevocationList(bad)
    with pytest.raises(ConfigError, match=f"revoked-tokens file {tmp_path}: Is a directory"):
        RevocationList(tmp_path)
