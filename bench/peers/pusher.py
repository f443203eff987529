"""A trainer's side of a push, in a process of its own: load one weight set into memory
(untimed: a trainer already holds its weights), say `ready`, then on `go` time
`hotweights.push` to the server and print one JSON line. Run by `PushTrigger`.

    python bench/peers/pusher.py MODEL_DIR URL MODEL {socket|shared-memory}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    directory, url, model, handover = sys.argv[1:5]
    from safetensors.torch import load_file

    import hotweights

    weights: dict[str, Any] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    for tensor in weights.values():  # resident, as a trainer's weights are
        tensor.add_(0)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    try:
        event = hotweights.push(url, weights, model=model, handover=handover)  # type: ignore[arg-type]
    except hotweights.PushFailed as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return 1
    seconds = time.perf_counter() - started
    print(json.dumps({"ok": True, "seconds": seconds, "event": event.to_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
