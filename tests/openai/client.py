"""Drives hivegate's OpenAI-compatible endpoint with the official `openai`
Python SDK (tests/openai.rs).

Usage: client.py BASE_URL API_KEY SCENARIO; prints one JSON object with
what the SDK saw. The SDK's own retries are off: the test counts requests."""

import json
import sys

import openai

HI = [{"role": "user", "content": "hi"}]


def error(e):
    return {
        "error": type(e).__name__,
        "status": getattr(e, "status_code", None),
        "message": getattr(e, "message", str(e)),
        "code": getattr(e, "code", None),
        "retry_after": e.response.headers.get("retry-after") if getattr(e, "response", None) is not None else None,
    }


def run(client, scenario):
    if scenario == "create":
        r = client.chat.completions.create(model="auto", messages=HI)
        c = r.choices[0]
        return {
            "text": c.message.content,
            "finish_reason": c.finish_reason,
            "model": r.model,
            "usage": r.usage.model_dump() if r.usage else None,
        }
    if scenario == "stream":
        pieces, usage, finish, models = [], None, None, set()
        stream = client.chat.completions.create(
            model="p", messages=HI, stream=True, stream_options={"include_usage": True}
        )
        for chunk in stream:
            models.add(chunk.model)
            if chunk.usage:
                usage = chunk.usage.model_dump()
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        return {"text": "".join(pieces), "chunks": len(pieces), "usage": usage,
                "finish_reason": finish, "models": sorted(models)}
    if scenario == "models":
        return {"ids": [m.id for m in client.models.list()]}
    if scenario == "tools":
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
        r = client.chat.completions.create(model="p", messages=HI, tools=tools, tool_choice="auto")
        calls = r.choices[0].message.tool_calls or []
        streamed = {}
        for chunk in client.chat.completions.create(model="p", messages=HI, tools=tools, stream=True):
            for c in chunk.choices:
                for t in c.delta.tool_calls or []:
                    s = streamed.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                    s["id"] = t.id or s["id"]
                    s["name"] += (t.function.name or "") if t.function else ""
                    s["arguments"] += (t.function.arguments or "") if t.function else ""
        return {
            "finish_reason": r.choices[0].finish_reason,
            "calls": [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in calls],
            "streamed": [streamed[i] for i in sorted(streamed)],
        }
    if scenario == "n2":
        client.chat.completions.create(model="auto", messages=HI, n=2)
    if scenario == "cancel":
        stream = client.chat.completions.create(model="p", messages=HI, stream=True)
        first = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = chunk.choices[0].delta.content
                break
        stream.close()
        return {"first": first}
    if scenario in ("bad_key", "limited"):
        # Two calls: the second meets the limit when one is configured.
        client.models.list()
        client.chat.completions.create(model="auto", messages=HI)
        client.chat.completions.create(model="auto", messages=HI)
    return {"unexpected": "no error"}


def main():
    base, key, scenario = sys.argv[1:4]
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)
    try:
        out = run(client, scenario)
    except openai.APIStatusError as e:
        out = error(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
