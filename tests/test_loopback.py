"""The tests' loopback HTTP server (:mod:`tests.loopback`) keeps its promises: it answers and records what it is
told to, refuses other methods, fails the test whose fake raised, and leaves no thread or socket behind."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.loopback import Answer, Loopback, Request


def test_answers_and_records_the_requests_of_its_methods() -> None:
    with Loopback(lambda r: Answer(201, r.body[::-1], {"x-seen": r.path}), methods=("POST",)) as server:
        answer = httpx.post(f"{server.url}/hook?a=1", content=b"abc", headers={"X-Token": "t"})
        refused = httpx.get(f"{server.url}/hook")
        (request,) = server.requests()
    assert (answer.status_code, answer.content, answer.headers["x-seen"]) == (201, b"cba", "/hook?a=1")
    assert answer.headers["content-length"] == "3"
    assert refused.status_code == 501
    assert (request.method, request.path, request.body) == ("POST", "/hook?a=1", b"abc")
    assert request.headers["x-token"] == "t"


def test_a_fake_that_raises_answers_500_and_fails_at_close() -> None:
    def broken(request: Request) -> Answer:
        raise KeyError("query")

    server = Loopback(broken)
    assert httpx.get(server.url).status_code == 500
    with pytest.raises(KeyError, match="query"):
        server.close()


def test_close_waits_for_the_answers_being_written_and_frees_the_port() -> None:
    answered = threading.Event()

    def slow(request: Request) -> Answer:
        time.sleep(0.5)
        answered.set()
        return Answer(200)

    before = set(threading.enumerate())
    server = Loopback(slow)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.url, timeout=0.1)  # the client leaves; the server still answers
    server.close()
    assert answered.is_set()
    assert set(threading.enumerate()) <= before
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url)
