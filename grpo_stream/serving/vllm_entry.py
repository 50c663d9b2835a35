"""vLLM's OpenAI api server, with its API key guarding every route but the probes.

Stock vLLM (0.32, `vllm/entrypoints/serve/middleware/authenticate.py`) checks the key
given by `--api-key` or `VLLM_API_KEY` only on paths under `/v1`, `/v2`, `/inference`
and `/cohere`. The dev-mode routes weight sync needs stay open to anyone who reaches the
port: `/collective_rpc` (runs any worker method), `/pause`, `/resume`,
`/update_weight_version`, `/weight_info`, `/reset_prefix_cache` and the NCCL transfer
routes. This entry point swaps vLLM's `AuthenticationMiddleware` for a subclass that
asks for the key on every path except `OPEN_PATHS` (liveness probes and metrics), then
runs vLLM's own api server `main()` with the same arguments. vLLM's key check itself
(constant-time comparison of hashes) is reused unchanged.

`grpo_stream.serving.server.build_command` runs it instead of `vllm.entrypoints.openai.api_server`
when `server.api_key` (or `server.api_key_env`) is set:

    VLLM_API_KEY=... python -m grpo_stream.serving.vllm_entry --model DIR --port 8000 ...
"""

from __future__ import annotations

OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})


def guard_every_route() -> type:
    """Make vLLM's middleware module hand out the all-routes guard; returns that class."""
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.middleware import authenticate

    base = authenticate.AuthenticationMiddleware

    class GuardEveryRoute(base):  # type: ignore[misc, valid-type]
        """vLLM's middleware, minus its path filter: only OPEN_PATHS go unchecked."""

        def __call__(self, scope, receive, send):  # noqa: ANN001 (ASGI signature)
            if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
                path = scope["path"].removeprefix(scope.get("root_path", ""))
                if path not in OPEN_PATHS and not self.verify_token(Headers(scope=scope)):
                    return JSONResponse({"error": "Unauthorized"}, status_code=401)(
                        scope, receive, send
                    )
            return self.app(scope, receive, send)

    # vLLM imports the class from this module when it builds the app (after this runs)
    authenticate.AuthenticationMiddleware = GuardEveryRoute
    return GuardEveryRoute


def main() -> None:
    guard_every_route()
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
