"""What a token costs the gateway: one admission check with a per-agent token
(PyJWT HS256 verify, the kid lookup, the scope and name checks) against one
with the shared secret (a constant-time compare), and a forged token (bad
signature: the work a flood of them costs before the failure limiter's 429).

Rounds alternate between the cases in one process, so the ratios do not
depend on the machine's speed; the best round of each is reported.

    python benchmarks/tokens.py [--rounds 7] [--number 20000]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from revconn._gateway.auth import Scope, SharedSecretPolicy, TokenPolicy
from revconn._gateway.tokens import SigningKey, TokenVerifier, issue_token


def cases() -> dict[str, Callable[[], object]]:
    old, new = SigningKey.generate(), SigningKey.generate()
    secret = SharedSecretPolicy("s" * 43)
    # Two keys, the token signed by the second: the rotation case.
    policy = TokenPolicy(TokenVerifier([new, old]), shared_secret=secret)
    token, _ = issue_token(old, "laptop", expires_in=3600)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    connect = Scope.CONNECT
    return {
        "shared secret": lambda: secret.authenticate("s" * 43, agent="laptop", scope=connect),
        "agent token": lambda: policy.authenticate(token, agent="laptop", scope=connect),
        "forged token": lambda: policy.authenticate(forged, agent="laptop", scope=connect),
        "issue a token": lambda: issue_token(new, "laptop"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    run = cases()
    best = dict.fromkeys(run, float("inf"))
    for _ in range(args.rounds):
        for name, fn in run.items():  # interleaved: one round of each in turn
            best[name] = min(best[name], timeit.timeit(fn, number=args.number) / args.number)
    base = best["shared secret"]
    print(f"{'case':<16}{'us/call':>10}{'x shared secret':>18}{'calls/s/core':>14}")
    for name, seconds in best.items():
        print(f"{name:<16}{seconds * 1e6:>10.1f}{seconds / base:>18.0f}{1 / seconds:>14,.0f}")


if __name__ == "__main__":
    main()
