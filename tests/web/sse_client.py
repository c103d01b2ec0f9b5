"""One SSE response read with httpx-sse (a parser we did not write), for clients.mjs.

Usage: sse_client.py URL [LAST_EVENT_ID]. Prints the frames as a JSON list of
{"event", "id", "data", "retry"}, or [{"status": N}] for a response that is not 200.
"""

import json
import sys

import httpx
from httpx_sse import connect_sse


def main() -> None:
    url = sys.argv[1]
    headers = {"Last-Event-ID": sys.argv[2]} if len(sys.argv) > 2 else {}
    frames = []
    with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
        with connect_sse(client, "GET", url, headers=headers) as source:
            if source.response.status_code != 200:
                print(json.dumps([{"status": source.response.status_code}]))
                return
            for sse in source.iter_sse():
                frames.append({"event": sse.event, "id": sse.id, "data": sse.data, "retry": sse.retry})
                if sse.event == "end":
                    break
    print(json.dumps(frames))


if __name__ == "__main__":
    main()
