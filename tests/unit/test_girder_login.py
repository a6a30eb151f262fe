"""One Girder log-in per run, not one per upload thread: with a remote Girder each log-in
is a round trip every thread's first request would wait for. After an authentication
error the token is forgotten and the next request logs in again."""

from __future__ import annotations

import json
import threading

import girder_client
from girder_client import HttpError

from girder_upload_stream.girder.errors import GirderAuthError
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.settings import GirderSettings

KEY = "k" * 40


class _Client:
    """girder-client as far as the store's log-in goes; ``logins`` counts them."""

    logins: list[str] = []
    refuse_next = False

    def __init__(self, apiUrl: str) -> None:
        self.token = ""

    def session(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def sendRestRequest(self, method, path, data=None, **kw):
        assert (method, path, data) == ("POST", "api_key/token", {"key": KEY})
        _Client.logins.append(threading.current_thread().name)
        return {"authToken": {"token": f"token-{len(_Client.logins)}"},
                "user": {"_id": "u" * 24}}

    def setToken(self, token):
        self.token = token

    def get(self, path, parameters=None):
        if _Client.refuse_next:
            _Client.refuse_next = False
            raise HttpError(status=401, url="http://girder/api/v1/x", method="GET",
                            text=json.dumps({"message": "bad token", "type": "access"}))
        return {"token": self.token}


def _store(monkeypatch) -> GirderStore:
    monkeypatch.setattr(girder_client, "GirderClient", _Client)
    _Client.logins, _Client.refuse_next = [], False
    settings = GirderSettings(api_url="http://127.0.0.1:1/api/v1", api_key=KEY)
    return GirderStore(settings, "topic")


def _token_in_a_thread(store: GirderStore) -> str:
    seen = []
    worker = threading.Thread(target=lambda: seen.append(store._client().token))
    worker.start()
    worker.join()
    return seen[0]


def test_every_thread_uses_the_one_token_of_one_log_in(monkeypatch):
    store = _store(monkeypatch)
    tokens = {_token_in_a_thread(store) for _ in range(8)}
    assert tokens == {"token-1"} and len(_Client.logins) == 1
    assert store.owner is not None


def test_a_refused_token_is_forgotten_and_the_next_request_logs_in_again(monkeypatch):
    store = _store(monkeypatch)
    client = store._client()
    _Client.refuse_next = True
    try:
        store._call(lambda: client.get("folder"), "list folders")
    except GirderAuthError:
        pass
    else:
        raise AssertionError("a 401 must raise GirderAuthError")
    assert _token_in_a_thread(store) == "token-2" and len(_Client.logins) == 2
    assert KEY not in repr(store.__dict__)  # the key never kept beside the token
