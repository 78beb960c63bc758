"""The HTTP client of one running server: generate, the admin endpoint's config, /metrics."""

from __future__ import annotations

from typing import Any

from xshare._http import request
from xshare.bench.serve.grid import Setting


class Client:
    """HTTP client of one running server: generate, admin config, /metrics."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, auth: bool = False) -> tuple[int, Any]:
        return request(self.base_url + path, method, self.token if auth else None, body, self.timeout,
                       text=path in ("/metrics", "/flush_cache"))

    def generate(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        status, out = self._request("POST", "/generate", {
            "text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}})
        if status != 200 or not isinstance(out, dict) or "text" not in out:
            raise RuntimeError(f"/generate answered {status}: {str(out)[:300]}")
        return out

    def set_config(self, setting: Setting) -> dict[str, Any]:
        status, out = self._request("PUT", "/xshare/config", setting.body(), auth=True)
        if status != 200:
            raise RuntimeError(f"PUT /xshare/config {setting.body()} answered {status}: {str(out)[:500]}")
        if out.get("config", {}).get("enabled") != setting.enabled or not out.get("consistent", False):
            raise RuntimeError(f"PUT /xshare/config: the ranks did not take {setting.body()}: {out}")
        return out

    def enable(self, on: bool) -> dict[str, Any]:
        status, out = self._request("POST", "/xshare/enable" if on else "/xshare/disable", None, auth=True)
        if status != 200:
            raise RuntimeError(f"POST /xshare/{'enable' if on else 'disable'} answered {status}: {str(out)[:500]}")
        return out

    def flush_cache(self) -> None:
        """SGLang's ``/flush_cache``: the prefix cache and, with speculative decoding, the NGRAM corpus are
        emptied (answered 200 only when the server is idle)."""
        status, out = self._request("POST", "/flush_cache")
        if status != 200:
            raise RuntimeError(f"/flush_cache answered {status}: {str(out)[:300]}")

    def metrics_text(self) -> str:
        status, out = self._request("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status} (is the server started with --enable-metrics?)")
        return str(out)
