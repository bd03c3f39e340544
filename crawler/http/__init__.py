"""Talking to any rate-limited HTTP service; nothing here knows Civitai or the disk.

- `transport`: the network behind one seam (`Transport`, `Response`, `AiohttpTransport`);
- `outcomes`: what every answer or transport failure means (`classify`, `classify_exception`);
- `servertext`: `ServerText`, how the server's words are cleaned (and the key redacted) as they come in;
- `gate`: `RateGate`, the slots, shared cooldown, pacer and AIMD rate every request passes;
- `client`: `HttpClient.get`, the retry loop over the three, with `HttpSettings`;
- `backoff`, `clock`: the capped exponential delay and the injectable time they share.

It imports nothing from `crawler` but `crawler.errors`.
"""
