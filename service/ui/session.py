"""Browser sessions for the dashboard: a login page trades an API token for an HttpOnly, SameSite=Strict
cookie; unsafe requests carrying that cookie must also carry a CSRF token.

The cookie holds `<token sha256>.<expiry in ms>.<hmac>` signed with a per-data-dir secret: never the token
itself, and the token hash is looked up on every request, so a token that no longer exists ends its
sessions too. Logout ends them server-side: the token's `sessions_not_before` is set (in the database, so on
every replica) and a cookie issued before it is refused, even if someone kept a copy. The CSRF token is an
HMAC of the cookie value (synchronizer pattern without server state):
pages embed it, scripts send it as `X-CSRF-Token`, forms as the `csrf` field.
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE = "trainctl_session"
CSRF_HEADER = "x-csrf-token"
TTL_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Sessions:
    def __init__(self, secret: bytes, ttl_s: int = TTL_S) -> None:
        self._secret, self.ttl_s = secret, ttl_s

    def _sign(self, purpose: str, payload: str) -> str:
        return hmac.new(self._secret, f"{purpose}|{payload}".encode(), hashlib.sha256).hexdigest()

    def issue(self, token_hash: str, now: float | None = None) -> str:
        expires_ms = int(((now if now is not None else time.time()) + self.ttl_s) * 1000)
        payload = f"{token_hash}.{expires_ms}"
        return f"{payload}.{self._sign('session', payload)}"

    def token_hash(self, cookie: str | None, now: float | None = None) -> str | None:
        """The token hash a valid, unexpired cookie names, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        token_hash, expires, sig = cookie.split(".")
        if not hmac.compare_digest(sig, self._sign("session", f"{token_hash}.{expires}")):
            return None
        try:
            if int(expires) / 1000 < (now if now is not None else time.time()):
                return None
        except ValueError:
            return None
        return token_hash

    def issued_after(self, cookie: str, not_before: float | None) -> bool:
        """Whether a (valid) cookie was issued after `not_before` (the token's last logout); True for None."""
        if not_before is None:
            return True
        try:
            issued = int(cookie.split(".")[1]) / 1000 - self.ttl_s
        except (IndexError, ValueError):
            return False
        return issued > not_before

    def csrf_token(self, cookie: str) -> str:
        return self._sign("csrf", cookie)

    def csrf_ok(self, cookie: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf_token(cookie), presented or "")
