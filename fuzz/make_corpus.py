"""Write the seed corpora under fuzz/corpus/ (deterministic; re-run after a
change of the harnesses' input formats): ``python fuzz/make_corpus.py``.

Seeds are real traffic between two revconn sessions and real HTTP/1.1
messages, in each harness's input format, so that the fuzzer starts from
inputs that reach deep into the decoders rather than from noise.
"""

from __future__ import annotations

import hashlib
import pathlib

import hpack

from revconn._proto import session as S

HERE = pathlib.Path(__file__).resolve().parent
CONNECT = [
    (b":method", b"CONNECT"),
    (b":protocol", b"revconn-http1"),
    (b":scheme", b"http"),
    (b":path", b"/"),
    (b":authority", b"upstream"),
]
REQUEST = b"GET /a?b=1 HTTP/1.1\r\nhost: upstream\r\n\r\n"


def record(type_: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One frame-mode record (fuzz_session.py's format)."""
    assert len(payload) < 256 and stream < 128
    return bytes([type_, flags, stream, len(payload)]) + payload


def session_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    gw, ag = S.TunnelSession(S.Role.GATEWAY), S.TunnelSession(S.Role.AGENT)
    gw.initiate()
    ag.initiate()
    gw_opening, ag_opening = gw.data_to_send(), ag.data_to_send()
    seeds["agent-opening"] = bytes([1, 0]) + gw_opening
    seeds["agent-opening-cut7"] = bytes([1, 7]) + gw_opening
    seeds["gateway-opening"] = bytes([0, 0]) + ag_opening
    ag.receive_data(gw_opening)
    gw.receive_data(ag_opening)
    ag.receive_data(gw.data_to_send())
    gw.receive_data(ag.data_to_send())
    ag.data_to_send()
    # (handshaken) the gateway's requests, as the agent gets them
    sid = gw.open_stream(CONNECT, end_stream=False)
    gw.send_data(sid, REQUEST, end_stream=False)
    gw.send_ping(b"\0\0\0\0\0\0\0\1")
    sid2 = gw.open_stream(CONNECT, end_stream=False)
    gw.send_data(sid2, REQUEST, end_stream=True)
    gw.reset_stream(sid2)
    to_agent = gw.data_to_send()
    seeds["agent-requests"] = bytes([3, 0]) + to_agent
    seeds["agent-requests-cut1"] = bytes([3, 1]) + to_agent
    # (handshaken) the agent's answers, as the gateway gets them; the
    # harness opens streams 1, 3 and 5 on its gateway
    ag.receive_data(to_agent)
    ag.data_to_send()
    ag.send_response(sid, 200, [(b"revconn-upstream-host", b"u:80")], end_stream=False)
    ag.send_data(sid, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi", end_stream=True)
    ag.send_ping(b"pingpong")
    ag.close(0, "shutdown")
    seeds["gateway-responses"] = bytes([2, 0]) + ag.data_to_send()
    # frame mode: records with correct headers and real HPACK blocks
    enc = hpack.Encoder()
    head = enc.encode(CONNECT, huffman=False)
    seeds["agent-frames"] = bytes([7, 0]) + b"".join(
        [
            record(0x1, 0x4, 1, head),  # HEADERS END_HEADERS
            record(0x0, 0x0, 1, REQUEST),  # DATA
            record(0x1, 0x5, 1, enc.encode([(b"x-t", b"1")])),  # trailers
            record(0x1, 0x4, 3, enc.encode(CONNECT, huffman=True)),
            record(0x3, 0x0, 3, (8).to_bytes(4, "big")),  # RST_STREAM
            record(0x6, 0x0, 0, b"12345678"),  # PING
            record(0x4, 0x0, 0, (3).to_bytes(2, "big") + (10).to_bytes(4, "big")),  # SETTINGS
            record(0x8, 0x0, 0, (1000).to_bytes(4, "big")),  # WINDOW_UPDATE
            record(0x2, 0x0, 5, bytes(5)),  # PRIORITY
        ]
    )
    enc = hpack.Encoder()
    seeds["gateway-frames"] = bytes([6, 3]) + b"".join(
        [
            record(0x1, 0x4, 1, enc.encode([(b":status", b"200")])),
            record(0x0, 0x1, 1, b"HTTP/1.1 204 No Content\r\n\r\n"),
            record(0x1, 0x0, 3, enc.encode([(b":status", b"502")])),  # no END_HEADERS
            record(0x9, 0x4, 3, enc.encode([(b"content-type", b"application/json")])),
            record(0x0, 0x9, 3, b"\x02{}\0\0"),  # DATA PADDED END_STREAM
            record(0x7, 0x0, 0, bytes(8) + b"shutdown"),  # GOAWAY
        ]
    )
    return seeds


def http1_seeds() -> dict[str, bytes]:
    """fuzz_http1.py's format: mode byte, piece size, message bytes."""
    requests = [
        b"GET /a/x/y?z=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nTrailer-A: v\r\n\r\n",
        b"PUT /d HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n\r\n\r\n"
        b"GET /g HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    ]
    responses = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;x=y\r\nab\r\n\r\n0\r\nT: 1\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil eof",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nnew protocol",
    ]
    seeds: dict[str, bytes] = {}
    for i, raw in enumerate(requests):
        seeds[f"request-{i}"] = bytes([0, 0]) + raw
        seeds[f"request-{i}-cut3"] = bytes([0, 3]) + raw
    for i, raw in enumerate(responses):
        for method_bits in (0, 2, 4):  # GET, HEAD, POST
            seeds[f"response-{i}-{method_bits}"] = bytes([1 | method_bits, 0]) + raw
        seeds[f"response-{i}-cut5"] = bytes([1, 5]) + raw
    return seeds


def write(name: str, seeds: dict[str, bytes]) -> None:
    folder = HERE / "corpus" / name
    folder.mkdir(parents=True, exist_ok=True)
    for label, data in seeds.items():
        digest = hashlib.sha1(data).hexdigest()[:8]
        (folder / f"seed-{label}-{digest}").write_bytes(data)


def main() -> None:
    write("session", session_seeds())
    write("http1", http1_seeds())


if __name__ == "__main__":
    main()
