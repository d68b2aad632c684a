"""Drives a running loraserve with the real client SDKs and prints what they saw, as JSON.

Runs in the clients environment (.venv-clients: lorax-client and the predibase SDK pin versions
that clash with the server's). It records observations only; tests/test_client_sdks.py asserts.

    .venv-clients/bin/python tests/clients/sdk_checks.py http://127.0.0.1:PORT ADAPTER_ID PROMPT
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from lorax import Client
from recording import error_of


def details(response) -> dict:
    d = response.details
    return {"finish_reason": str(getattr(d.finish_reason, "value", d.finish_reason)),
            "prompt_tokens": d.prompt_tokens, "generated_tokens": d.generated_tokens, "seed": d.seed,
            "token_ids": [t.id for t in d.tokens], "prefill": [[t.id, t.logprob] for t in d.prefill],
            "alternatives": [[a.id for a in (t.alternative_tokens or [])] for t in d.tokens],
            "best_of": len(d.best_of_sequences or [])}


def stream(client: Client, prompt: str, **kw) -> dict:
    events = list(client.generate_stream(prompt, **kw))
    last = events[-1]
    return {"texts": [e.token.text for e in events], "ids": [e.token.id for e in events],
            "generated_text": last.generated_text,
            "finish_reason": str(getattr(last.details.finish_reason, "value", last.details.finish_reason))}


def lorax_checks(url: str, adapter: str, prompt: str) -> dict:
    client = Client(f"{url}/any-tenant/deployments/v2/llms/default", timeout=120)
    seeded = dict(do_sample=True, temperature=0.8, seed=7, max_new_tokens=12)
    out = {
        "base": details(client.generate(prompt, max_new_tokens=32)),
        "adapter": details(client.generate(prompt, max_new_tokens=32, adapter_id=adapter)),
        "stream_base": stream(client, prompt, max_new_tokens=12),
        "stream_adapter": stream(client, prompt, max_new_tokens=12, adapter_id=adapter),
        "prefill": details(client.generate(prompt, max_new_tokens=2, decoder_input_details=True)),
        "alternatives": details(client.generate(prompt, max_new_tokens=3, return_k_alternatives=2)),
        "stop": details(client.generate("Count: 1, 2, 3,", max_new_tokens=30, stop_sequences=[" 5"])),
        "seeded": [client.generate(prompt, **seeded).generated_text for _ in range(2)],
        "best_of": details(client.generate(prompt, max_new_tokens=6, best_of=2, do_sample=True)),
        "errors": {
            "too_long": error_of(lambda: client.generate("word " * 3000, max_new_tokens=5)),
            "too_many_new": error_of(lambda: client.generate(prompt, max_new_tokens=100000)),
            "too_many_stops": error_of(lambda: client.generate(prompt, stop_sequences=list("abcdefg"))),
            "missing_adapter": error_of(lambda: client.generate(prompt, adapter_id="no-such/1")),
            "foreign_adapter": error_of(lambda: client.generate(prompt, adapter_id="foreign/1")),
            "missing_adapter_stream": error_of(lambda: list(client.generate_stream(prompt, adapter_id="no-such/1"))),
        },
    }
    with ThreadPoolExecutor(4) as pool:  # a failing adapter load beside requests that must succeed
        good = [pool.submit(client.generate, prompt, max_new_tokens=8, adapter_id=adapter) for _ in range(3)]
        bad = pool.submit(error_of, lambda: client.generate(prompt, adapter_id="corrupt/1"))
        out["concurrent"] = {"good": [len(f.result().generated_text) > 0 for f in good], "bad": bad.result()}
    return out


def predibase_checks(url: str, adapter: str, prompt: str) -> dict:
    os.environ["PREDIBASE_GATEWAY"] = url
    from predibase import Predibase

    pb = Predibase(api_token="pb_local_test_token")
    client = pb.deployments.client("default", serving_url_override=url)
    base = client.generate(prompt, max_new_tokens=16)
    tuned = client.generate(prompt, max_new_tokens=16, adapter_id=adapter)
    streamed = "".join(r.token.text for r in client.generate_stream(prompt, max_new_tokens=8, ignore_eos_token=True))
    missing = error_of(lambda: pb.deployments.client("qwen3-8b", serving_url_override=url).generate(prompt))
    return {"base": base.generated_text, "adapter": tuned.generated_text, "stream": streamed,
            "unknown_deployment": missing}


if __name__ == "__main__":
    server_url, adapter_id, text = sys.argv[1:4]
    report = {"lorax": lorax_checks(server_url, adapter_id, text),
              "predibase": predibase_checks(server_url, adapter_id, text)}
    sys.stdout.write("\n@@REPORT@@" + json.dumps(report))
